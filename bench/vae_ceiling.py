"""The VAE's ceiling on the *validation* scenes: what a base's VAE keeps of what a segmentor needs (for choices).

    python bench/vae_ceiling.py --runs outputs/bench_demo/default/seed0 --bases shipped=crfm/toy/tiny_sd35_base \
        refit=outputs/base_decoder/tiny_sd35_base

For each finished demo run (its scenes and judge) and each base: the run's validation images at the generator's
resolution, as they are and through the base's VAE (encode, posterior mode, decode: `VAEReconstructions`, the demo's
`vae` row), scored by the run's judge (it never guides). Also the mean absolute error of the pixels and of their
differences (edges) per class. Mean ± std over runs; IoU per class and as a share of the real images'.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from crfm.toy.toydata import CLASSES
from crfm.utils.runs import mean_std, print_table


def errors_per_class(reals, recons, num_cls: int) -> dict[str, float]:
    """Mean absolute error of the pixels and of the horizontal pixel differences (edges), on each class's pixels (for
    edges: both pixels of the pair in the class), of reconstructed items against the real ones."""
    sums = torch.zeros(2, num_cls, dtype=torch.float64)
    counts = torch.zeros(2, num_cls, dtype=torch.float64)
    for real, recon in zip(reals, recons, strict=True):
        label = real["label"]
        error = (recon["image"] - real["image"]).abs().mean(0)
        edge_error = (recon["image"].diff(dim=-1) - real["image"].diff(dim=-1)).abs().mean(0)  # horizontal
        for k in range(num_cls):
            pixels, edges = label == k, (label[:, 1:] == k) & (label[:, :-1] == k)
            sums[0, k] += error[pixels].sum()
            counts[0, k] += pixels.sum()
            sums[1, k] += edge_error[edges].sum()
            counts[1, k] += edges.sum()
    mean = sums / counts.clamp_min(1)
    return {f"MAE.{c}": float(mean[0, k]) for k, c in enumerate(CLASSES)} | {
        f"edge MAE.{c}": float(mean[1, k]) for k, c in enumerate(CLASSES)
    }


def measure(run: Path, base: Path) -> dict[str, float]:
    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.segmentation.adapter import load_segmentor
    from crfm.segmentation.evaluate import mask_fidelity
    from crfm.toy.demo.stages import VAEReconstructions

    settings = json.loads((run / "demo_settings.json").read_text())
    root = run / "toydata"
    real = PairDataset(read_index(root / "val.jsonl", root), root, resolution=settings["resolution"],
                       num_cls=len(CLASSES))  # fmt: skip
    judge = load_segmentor(run / "seg_judge" / "config.py", run / "seg_judge" / "segmentor.pth", device="cpu",
                           num_cls=len(CLASSES))  # fmt: skip
    values: dict[str, float] = {}
    reconstructions = VAEReconstructions(real, base / "vae")
    recon = [reconstructions[i] for i in range(len(real))]  # each image through the VAE once: scored and measured
    for name, dataset in (("real", real), ("vae", recon)):
        scored = mask_fidelity(judge, dataset, len(CLASSES), progress=False)
        values[f"{name} mIoU"] = 100 * scored["mIoU"]
        values.update({f"{name} IoU.{c}": 100 * v for c, v in zip(CLASSES, scored["IoU"], strict=True)})
    values["vae / real mIoU"] = values["vae mIoU"] / values["real mIoU"]
    values.update({f"vae / real IoU.{c}": values[f"vae IoU.{c}"] / values[f"real IoU.{c}"] for c in CLASSES})
    return values | errors_per_class([real[i] for i in range(len(real))], recon, len(CLASSES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished demo runs (scenes, judge)")
    parser.add_argument("--bases", nargs="+", required=True, help="NAME=PIPELINE_DIR")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bases = dict(b.split("=", 1) for b in args.bases)
    results = {name: [measure(run, Path(base)) for run in args.runs] for name, base in bases.items()}
    keys = list(dict.fromkeys(k for runs in results.values() for r in runs for k in r))
    lines = ["| quantity | " + " | ".join(f"{n} ({len(results[n])} runs)" for n in bases) + " |"]
    lines.append("|---|" + "---|" * len(bases))
    for key in keys:
        digits = 3 if "MAE" in key or "/" in key else 2
        lines.append(f"| {key} | " + " | ".join(mean_std([r[key] for r in results[n]], digits) for n in bases) + " |")
    print_table("\n".join(lines) + "\n", args.table, "python bench/vae_ceiling.py " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
