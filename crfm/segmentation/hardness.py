"""Hardness-aware resampling (FreeMask): more synthetic images for the masks a segmentor finds hard.

    python -m crfm.segmentation.hardness --data_root data/loveda --json_file train.jsonl --num_cls 7 \
        --mmseg_config work_dirs/seg_real/config.py --mmseg_ckpt work_dirs/seg_real/segmentor.pth \
        --out work_dirs/num_per_mask.json [--min_per_mask 1 --max_per_mask 5]
    python test.py ... --num_per_mask_file work_dirs/num_per_mask.json

(also `crfm-hardness`). A segmentor trained on the real set gives each class its mean per-pixel cross-entropy over
the real images (`crfm.segmentation.filter.class_mean_losses`). A mask's expected difficulty is the pixel-weighted
mean of its classes' losses, sum_c pixels_c * class_mean_loss_c / labelled pixels. The masks are ranked by it and
get synthetic counts linearly by rank, from `--min_per_mask` for the easiest to `--max_per_mask` for the hardest
(masks of equal hardness share their mean rank, so they get the same count). FreeMask draws 1..20 per mask by
hardness rank; the defaults 1..5 keep the paper's x3 on average.

`--out` holds {"counts": {mask path as in the index: count}, "hardness": {...}, "class_mean_loss": [...],
"min_per_mask", "max_per_mask", "classes"}; test.py's `--num_per_mask_file` reads its "counts".
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crfm.data.dataset import PairDataset, check_index_pairs
from crfm.segmentation.filter import ClassLosses, class_mean_losses
from crfm.utils.fileio import write_text_atomic
from crfm.utils.flags import (
    UsageError,
    add_data_flags,
    add_run_flags,
    add_segmentor_flags,
    bounded,
    entry_point,
    positive_int,
    resolve_device,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.segmentation.hardness", description=__doc__.split("\n\n")[0])
    add_data_flags(parser, "index.jsonl", "real labelled index (the masks to rank)", data_root_help="real dataset root")
    add_segmentor_flags(parser, required=True, purpose="of a segmentor trained on the real set")
    parser.add_argument("--out", required=True, help="counts JSON to write (test.py's --num_per_mask_file)")
    parser.add_argument("--min_per_mask", type=bounded(int, 0), default=1, help="synthetic images for the easiest mask")
    parser.add_argument("--max_per_mask", type=positive_int, default=5, help="synthetic images for the hardest mask")
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="resize (short side + centre crop) first, e.g. to the synthesis's",
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per segmentor call")
    add_run_flags(parser, seed_help=None, device=True)
    return parser


def mask_hardness(losses: ClassLosses) -> np.ndarray:
    """Per item: sum_c pixels_c * class_mean_loss_c / labelled pixels (0 for a mask with nothing labelled)."""
    means = np.array([0.0 if m is None else m for m in losses.means()])  # a class in a mask always has a mean
    labelled = losses.item_pixels.sum(axis=1)
    return np.where(labelled > 0, losses.item_pixels @ means / np.maximum(labelled, 1), 0.0)


def counts_by_rank(hardness: np.ndarray, min_per_mask: int, max_per_mask: int) -> np.ndarray:
    """Counts linear in hardness rank: `min_per_mask` for the easiest, `max_per_mask` for the hardest; ties share
    their mean rank (equal hardness, equal count), so counts never decrease with hardness."""
    n = len(hardness)
    ranks = np.empty(n)
    ranks[np.argsort(hardness, kind="stable")] = np.arange(n)
    _, group = np.unique(hardness, return_inverse=True)
    ranks = (np.bincount(group, weights=ranks) / np.bincount(group))[group]
    fraction = ranks / (n - 1) if n > 1 else np.full(n, 0.5)
    return np.floor(min_per_mask + (max_per_mask - min_per_mask) * fraction + 0.5).astype(int)


def format_table(sources: Sequence[str], hardness: np.ndarray, counts: np.ndarray, shown: int = 5) -> str:
    order = np.argsort(-hardness, kind="stable")
    picks = list(order[:shown]) + [i for i in order[max(shown, len(order) - shown) :]]
    lines = ["| mask | hardness | synthetic count |", "|---|---|---|"]
    for rank, i in enumerate(picks):
        if rank == shown and len(order) > 2 * shown:
            lines.append("| ... | | |")
        lines.append(f"| {sources[i]} | {hardness[i]:.4f} | {counts[i]} |")
    lines.append(f"| **mean over {len(counts)} masks** | {hardness.mean():.4f} | {counts.mean():.2f} |")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    if args.max_per_mask < args.min_per_mask:
        raise UsageError(f"--max_per_mask: must be >= --min_per_mask {args.min_per_mask}, got {args.max_per_mask}")


def rank_masks(args: argparse.Namespace) -> dict:
    """Rank the real masks by expected difficulty, write `--out`, print the hardest and easiest; the result."""
    check_args(args)
    data_root = Path(args.data_root)
    # Every pair opened (colour masks, class ids >= num_cls named) before any model loads.
    items = check_index_pairs(data_root, args.json_file, args.num_cls, progress=not args.no_progress)
    dataset = PairDataset(items, data_root, resolution=args.resolution, num_cls=args.num_cls)

    from crfm.segmentation.adapter import load_segmentor

    segmentor = load_segmentor(args.mmseg_config, args.mmseg_ckpt, resolve_device(args.device), args.num_cls)
    losses = class_mean_losses(segmentor, dataset, args.num_cls, args.batch_size, progress=not args.no_progress)
    hardness = mask_hardness(losses)
    counts = counts_by_rank(hardness, args.min_per_mask, args.max_per_mask)
    sources = [item.source for item in items]
    result = {
        "counts": {s: int(c) for s, c in zip(sources, counts, strict=True)},
        "hardness": {s: float(h) for s, h in zip(sources, hardness, strict=True)},
        "class_mean_loss": losses.means(),
        "classes": list(segmentor.class_names),
        "min_per_mask": args.min_per_mask,
        "max_per_mask": args.max_per_mask,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(format_table(sources, hardness, counts))
    mean = counts.mean() if len(counts) else math.nan
    print(f"wrote {args.out}: {int(counts.sum())} synthetic images for {len(counts)} masks ({mean:.2f} per mask)")
    return result


main = entry_point(build_parser, rank_masks)


if __name__ == "__main__":
    raise SystemExit(main())
