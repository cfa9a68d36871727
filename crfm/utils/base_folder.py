"""The base model folder (SD3/SD3.5 in diffusers layout) checked before anything loads, so a missing part is
named in one line instead of surfacing as a loader's error about some config.json."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from crfm.utils.constants import WEIGHT_SUFFIXES
from crfm.utils.errors import UsageError

DOWNLOAD_HINT = (
    "download SD3.5 with `huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir "
    "./sd3.5_medium`, or use the shipped tiny base crfm/toy/tiny_sd35_base"
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
            raise UsageError(f"base {path} lacks {name}/ (listed in model_index.json): {DOWNLOAD_HINT}")
        is_tokenizer = name.startswith("tokenizer")
        if not is_tokenizer and not any((folder / f).is_file() for f in ("config.json", "scheduler_config.json")):
            raise UsageError(f"base {path}: {name}/ has no config.json (an incomplete download?)")
        weighted = not is_tokenizer and name != "scheduler"
        if weighted and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
            raise UsageError(f"base {path}: {name}/ has no weights (*.safetensors); an incomplete download?")
    return path
