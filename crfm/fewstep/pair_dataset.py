"""Reflow pairs read back for training: their record, the σ boundaries of the trained segments, the dataset.

`python -m crfm.reflow` (`crfm.fewstep.pairs`) writes a pair as the teacher's path through K_p + 1 points of the
uniform σ grid: z_0 = the noise (σ = 1, redrawn from its seed and item id), z_1 … z_{K_p−1} (the stored segment
boundaries) and z_{K_p} = the clean latent (σ = 0). A student trained on K segments (K divides K_p) reads the
boundaries of its segments; the loss on them is `training/reflow.py` (`train.py --reflow_pairs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from crfm.data.dataset import PairDataset
from crfm.data.index import DatasetError, read_index
from crfm.utils.fileio import read_json
from crfm.utils.flags import UsageError

# `crfm.fewstep.pairs` and the sampler are imported where used: they bring the synthesis loop, which train.py,
# the one user of this module, does not otherwise load.


def read_pairs_meta(pairs_dir: str | Path) -> dict:
    from crfm.fewstep.pairs import PAIRS_FORMAT, PAIRS_META

    path = Path(pairs_dir) / PAIRS_META
    if not path.is_file():
        raise DatasetError(f"{path} not found: --reflow_pairs must be a folder written by python -m crfm.reflow")
    meta = read_json(path, "the pairs' record")
    if meta.get("format") != PAIRS_FORMAT:
        raise DatasetError(f"{path}: format {meta.get('format')!r}, expected {PAIRS_FORMAT}")
    return meta


def trained_grid_indices(meta: Mapping, segments: int) -> tuple[int, ...]:
    """Grid indices 0, …, N of the boundaries of `segments` equal segments of the pairs' N-step uniform grid; the
    inner ones must be stored, so `segments` must divide the pairs' own --segments."""
    from crfm.fewstep.pairs import segment_indices

    stored = int(meta["segments"])
    if segments < 1 or stored % segments:
        raise UsageError(f"--seqrf_segments {segments} must divide the pairs' --segments {stored}")
    steps = int(meta["num_inference_steps"])
    return (0, *segment_indices(steps, segments), steps)


def segment_boundaries(scheduler, meta: Mapping, segments: int, latent_hw: tuple[int, int], patch: int) -> tuple:
    """σ at the boundaries of `segments` equal segments of the pairs' uniform grid (`trained_grid_indices`)."""
    from crfm.sampling.sampler import set_timesteps

    set_timesteps(scheduler, int(meta["num_inference_steps"]), latent_hw, patch, "cpu", "uniform")
    return tuple(float(scheduler.sigmas[i]) for i in trained_grid_indices(meta, segments))


class ReflowPairs(torch.utils.data.Dataset):
    """The pairs of `pairs_dir` with their masks and prompt vectors (from `data_root`/`vectors_dir`, the dataset the
    pairs were made from). Items: `path` [K + 1, C, h, w] (noise, boundaries, clean latent), `label`,
    `prompt_embeds`, `pooled_prompt_embeds`, `position`."""

    def __init__(
        self, pairs_dir: str | Path, data_root: str | Path, vectors_dir: str | Path, num_cls: int, resolution: int,
        segments: int = 1,
    ) -> None:  # fmt: skip
        self.pairs_dir = Path(pairs_dir)
        self.meta = read_pairs_meta(pairs_dir)
        for key, value in (("num_cls", num_cls), ("resolution", resolution)):
            if self.meta[key] != value:
                raise UsageError(
                    f"--reflow_pairs {pairs_dir}: the pairs were made with {key} {self.meta[key]}, not {value}"
                )
        self.keys = [f"state_{i}" for i in trained_grid_indices(self.meta, segments)[1:-1]]
        self.items = read_index(self.pairs_dir / "index.jsonl", data_root)
        self.base = PairDataset(self.items, data_root, resolution=resolution, num_cls=num_cls, vectors_dir=vectors_dir)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        from crfm.fewstep.pairs import load_pair_latents
        from crfm.sampling.sampler import initial_noise

        sample = dict(self.base[position])
        del sample["image"], sample["prompt"]  # the teacher's latents stand for the image
        record = self.items[position].record
        stored = load_pair_latents(self.pairs_dir, record)
        noise = initial_noise([record["noise_id"]], record["seed"], tuple(stored["latents"].shape))[0]
        sample["path"] = torch.stack([noise, *(stored[k] for k in self.keys), stored["latents"]])
        return sample
