"""The on-disk store of VAE latents made by `python -m crfm.training.cache_latents`, read by `train.py --latents_path`.

Training draws a fresh posterior sample of every image at every step (with the step's own generator), so the
store keeps what that draw is made from, not a sample. Item `i` of the index is `<dir>/<i>.safetensors` with

- `latent_parameters`: the VAE posterior's parameters [2C, h, w] (mean and log-variance, as `AutoencoderKL.encode`
  returns them in `latent_dist.parameters`), float32: sampled with the step's generator they give exactly the
  latents a fresh encode would;
- `mask_condition`: the mask branch's input in the cache's `--mask_encoding` ([C, h, w] SD3-scaled posterior mode
  for grey and palette; [num_cls, h, w] class fractions for onehot, which needs no VAE), deterministic, so stored
  as used;
- `latent_parameters_flipped`, `mask_condition_flipped`: the same for the horizontally flipped pair, when made
  with `--flip_prob` > 0 (an encoder does not commute with flipping, so flipping stored latents would not do).

Each file's header names the item's image and label and a digest of their bytes: a re-run re-encodes edited or
damaged items, and training refuses a file made for another item. `<dir>/latents.json` records what every file
was made with: resolution, VAE identity (digests of its config and its weight files), mask encoding, num_cls and
whether flipped pairs are there; `check_latent_cache` refuses a cache that does not fit a training run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crfm.data.index import DatasetError, IndexItem
from crfm.utils.constants import WEIGHT_SUFFIXES
from crfm.utils.fileio import atomic_path, read_json, sha256_of_files
from crfm.utils.flags import UsageError, one_line

MANIFEST_FILE = "latents.json"
LATENT_KEY = "latent_parameters"
MASK_KEY = "mask_condition"
FLIPPED = "_flipped"  # suffix of the flipped pair's keys
CACHE_COMMAND = "python -m crfm.training.cache_latents"


def stored_keys(flips: bool) -> tuple[str, ...]:
    """The tensors of one item's file (the flipped pair's too with `flips`)."""
    keys = (LATENT_KEY, MASK_KEY)
    return keys + tuple(key + FLIPPED for key in keys) if flips else keys


def item_latent_path(latents_dir: str | Path, position: int) -> Path:
    return Path(latents_dir) / f"{position}.safetensors"


def vae_identity(pretrained: str | Path) -> dict[str, str]:
    """Digests of the base's VAE: its architecture (config.json without diffusers' private keys such as the
    version that saved it) and the bytes of its weight files. Content, not paths or times, so a copied folder
    is the same VAE and a re-trained one is not (about 0.3 s for SD3.5's 168 MB)."""
    folder = Path(pretrained) / "vae"
    config = json.loads((folder / "config.json").read_text())
    architecture = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {
        "config_sha256": hashlib.sha256(architecture.encode()).hexdigest(),
        "weights_sha256": sha256_of_files(weights),
    }


class VAEConfig:
    """Stands in for the VAE where latents are cached: its config (SD3's shift and scaling factors, its
    down-sampling), no weights. `crfm.training.objective.flow_matching_loss` reads only the config then."""

    def __init__(self, pretrained: str | Path) -> None:
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(json.loads((Path(pretrained) / "vae" / "config.json").read_text()))

    def encode(self, *args, **kwargs):
        raise RuntimeError("latents are cached (--latents_path): no VAE weights were loaded to encode with")


def cache_settings(pretrained: str | Path, resolution: int, mask_encoding: str, num_cls: int, flips: bool) -> dict:
    """What every file of a cache is made with (its manifest)."""
    return {
        "format": "crfm-latents/1",
        "resolution": resolution,
        "vae": vae_identity(pretrained),
        "mask_encoding": mask_encoding,
        "num_cls": num_cls,
        "flips": flips,
    }


def check_latent_cache(
    latents_dir: str | Path, pretrained: str | Path, resolution: int, mask_encoding: str, num_cls: int, flip_prob: float
) -> dict:
    """The manifest of `latents_dir`, or a `UsageError` (one line) naming every setting in which it differs from
    the training run: resolution, the base's VAE (config or weights), mask encoding, num_cls, flipped pairs."""
    path = Path(latents_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UsageError(f"--latents_path {latents_dir} has no {MANIFEST_FILE}: not a latent cache ({CACHE_COMMAND})")
    made = read_json(path, "the latent cache's record")
    wanted = cache_settings(pretrained, resolution, mask_encoding, num_cls, flips=flip_prob > 0)
    differences = [
        f"{key} {made.get(key)!r}, not --{key} {wanted[key]!r}"
        for key in ("resolution", "mask_encoding", "num_cls")
        if made.get(key) != wanted[key]
    ]
    if made.get("vae") != wanted["vae"]:
        differences.append(f"another VAE than {Path(pretrained) / 'vae'} (its config or weights differ)")
    if flip_prob > 0 and not made.get("flips"):
        differences.append(f"no flipped pairs, which --flip_prob {flip_prob} needs")
    if differences:
        raise UsageError(
            f"--latents_path {latents_dir} was made with {'; '.join(differences)}: "
            f"re-run {CACHE_COMMAND} with this run's flags into another --work_dir"
        )
    return made


def item_signature(data_root: str | Path, item: IndexItem) -> dict[str, str]:
    """The item a cached file belongs to: its image and label paths and a digest of their bytes."""
    files = [Path(data_root) / item.target, Path(data_root) / item.source]
    return {"target": item.target, "source": item.source, "sha256": sha256_of_files(files)}


def stored_signature(path: str | Path, keys: Sequence[str]) -> dict[str, str] | None:
    """The signature in a cached file's header, or None if the file is absent, unreadable or lacks `keys`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if set(keys) - set(handle.keys()):
                return None
            return handle.metadata() or {}
    except Exception:  # missing, truncated or foreign file: safetensors raises its own error types
        return None


def save_item_latents(path: str | Path, tensors: dict[str, torch.Tensor], signature: dict[str, str]) -> None:
    """One item's tensors (no batch axis), written atomically with its signature in the header."""
    with atomic_path(path) as tmp:
        save_file({key: t.contiguous().cpu() for key, t in tensors.items()}, str(tmp), metadata=signature)


def load_item_latents(
    latents_dir: str | Path, position: int, item: IndexItem, keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The cached tensors `keys` of index row `position`; a missing, damaged or foreign file is a `DatasetError`
    naming it."""
    path = item_latent_path(latents_dir, position)
    fix = f"run {CACHE_COMMAND} on this index with --work_dir {latents_dir} (it re-encodes missing and damaged files)"
    if not path.is_file():
        raise DatasetError(f"{item.where()}: cached latents {path} are missing: {fix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            # Copies, not views of the memory-mapped file: a file damaged or rewritten later can't fault them.
            tensors = {key: handle.get_tensor(key).clone() for key in keys}
    except Exception as exc:  # truncated or foreign file, missing key: safetensors raises its own error types
        raise DatasetError(
            f"{path}: cached latents cannot be read ({one_line(exc)}); item {item.where()}: {fix}"
        ) from exc
    if (meta.get("target"), meta.get("source")) != (item.target, item.source):
        raise DatasetError(
            f"{item.where()}: cached latents {path} belong to {meta.get('target')!r}, not to this item: "
            "the cache was made from another index"
        )
    return tensors


class LatentPairDataset(torch.utils.data.Dataset):
    """`PairDataset`'s items as train.py reads them from a latent cache: cached latents and mask condition (and
    their flipped pair with `flips`), prompt vectors, position. No image or label is decoded."""

    def __init__(self, items: Sequence[IndexItem], latents_dir: str | Path, vectors_dir: str | Path, flips: bool):
        self.items = list(items)
        self.latents_dir = Path(latents_dir)
        self.vectors_dir = Path(vectors_dir)
        self.keys = stored_keys(flips)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        from crfm.data.vectors import load_item_vectors

        item = self.items[position]
        sample = {"prompt": item.prompt, "position": position}
        sample.update(load_item_latents(self.latents_dir, position, item, self.keys))
        sample.update(load_item_vectors(self.vectors_dir, item))
        return sample
