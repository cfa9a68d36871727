"""The base model folder (SD3/SD3.5 in diffusers layout) checked before anything loads, so a missing part is
named in one line instead of surfacing as a loader's error about some config.json."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from crfm.utils.constants import WEIGHT_SUFFIXES
from crfm.utils.errors import UsageError
from crfm.utils.fileio import read_json

DOWNLOAD_HINT = (
    "download SD3.5 with `hf download stabilityai/stable-diffusion-3.5-medium --local-dir sd3.5_medium` (after "
    "`hf auth login`), or use the shipped tiny base crfm/toy/tiny_sd35_base"
)


def check_base_folder(path: str | Path, components: Iterable[str]) -> Path:
    """Raise `UsageError` naming the first missing piece of `components` (e.g. "transformer", "vae") in `path`."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UsageError(f"{path} is not a diffusers pipeline folder (no model_index.json): {DOWNLOAD_HINT}")
    listed = json.loads((path / "model_index.json").read_text())
    for name in components:
        spec = listed.get(name)
        if not isinstance(spec, list) or spec[0] is None:
            continue  # not part of this pipeline (e.g. SD3 without T5); diffusers handles it
        folder = path / name
        if not folder.is_dir():
            raise UsageError(f"{path}: the base lacks {name}/ (listed in model_index.json): {DOWNLOAD_HINT}")
        is_tokenizer = name.startswith("tokenizer")
        if not is_tokenizer and not any((folder / f).is_file() for f in ("config.json", "scheduler_config.json")):
            raise UsageError(f"{path}: {name}/ has no config.json (an incomplete download?)")
        weighted = not is_tokenizer and name != "scheduler"
        if weighted and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
            raise UsageError(f"{path}: {name}/ has no weights (*.safetensors); an incomplete download?")
    return path


def _component_config(path: Path, name: str) -> dict:
    """A component's config.json ({} where the base has no such component: nothing of it to check)."""
    config = path / name / "config.json"
    return read_json(config, f"the {name}'s config") if config.is_file() else {}


def check_resolution(path: str | Path, resolution: int, flag: str = "--resolution") -> None:
    """Refuse, before anything loads or is written, a side the base cannot train or sample at: it must be a
    multiple of the VAE's down-sampling x the transformer's patch size, and give no more patches per side than
    the base's position grid (`pos_embed_max_size`) holds."""
    path = Path(path)
    vae, transformer = _component_config(path, "vae"), _component_config(path, "transformer")
    factor = 2 ** (len(vae.get("block_out_channels", ())) - 1) if vae.get("block_out_channels") else 1
    patch = int(transformer.get("patch_size", 1))
    step = factor * patch
    if resolution % step:
        raise UsageError(
            f"{flag}: must be a multiple of {step} (the VAE's {factor}x down-sampling x patch size {patch} of "
            f"{path}), got {resolution}"
        )
    grid = transformer.get("pos_embed_max_size")
    if grid is not None and resolution // step > grid:
        raise UsageError(
            f"{flag}: at most {grid * step} ({resolution // step} patches per side exceed the position grid of "
            f"{grid} of {path}), got {resolution}"
        )
