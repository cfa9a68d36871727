"""Mask fidelity: how well a segmentor recovers the conditioning masks from a (synthesized) dataset.

    python -m crfm.segmentation.evaluate --data_root work_dirs/synth --json_file index.jsonl \
        --mmseg_config work_dirs/seg/config.py --mmseg_ckpt work_dirs/seg/segmentor.pth --num_cls 6

Prints per-class IoU, mIoU and pixel accuracy (aAcc) as a table (in %) and writes them as JSON (`--out`, default
`<data_root>/mask_fidelity.json`; fractions in 0..1, where mmseg's `metrics.json` has percentages). This is how the
paper judges synthesis: a good synthetic image is one in which a segmentor trained on real data finds the mask it
was drawn from. The IoU arithmetic is mmseg's own.

The score means little when the segmentor is the one that guided CRFM: sampling lowered that segmentor's loss on
these very images, so it finds their masks more readily than any other would. The JSON's `scorer` says which it
was: `judge` (never guided these images, per the synthesis record `synthesis.json`), `guide` (it did: the number is
inflated, not a measure of fidelity) or `unknown` (no record), and the table says so too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from crfm.data.dataset import PairDataset
from crfm.data.index import IGNORE_INDEX, read_index
from crfm.utils.fileio import read_json, write_text_atomic
from crfm.utils.flags import (
    add_data_flags,
    add_run_flags,
    add_segmentor_flags,
    entry_point,
    positive_int,
    resolve_device,
)


@torch.no_grad()
def mask_fidelity(
    segmentor, dataset: PairDataset, num_cls: int, batch_size: int = 8, progress: bool = True
) -> dict[str, object]:
    """Per-class IoU, mIoU and aAcc of `segmentor` predictions against each item's label."""
    from mmseg.evaluation import IoUMetric
    from tqdm.auto import tqdm

    totals = [torch.zeros(num_cls, dtype=torch.float64) for _ in range(4)]  # intersect, union, pred, label
    device = next(segmentor.parameters()).device
    for begin in tqdm(range(0, len(dataset), batch_size), desc="evaluate", unit="batch", disable=not progress):
        samples = [dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))]
        images = torch.stack([s["image"] for s in samples]).to(device)
        predictions = segmentor(images).argmax(dim=1).cpu()
        for prediction, sample in zip(predictions, samples, strict=True):
            areas = IoUMetric.intersect_and_union(prediction, sample["label"], num_cls, IGNORE_INDEX)
            for total, area in zip(totals, areas, strict=True):
                total += area.double()
    metrics = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    per_class = metrics["IoU"]
    present = totals[3].numpy() > 0  # classes absent from every label have no IoU
    return {
        "aAcc": float(metrics["aAcc"]),
        "mIoU": float(np.nanmean(np.where(present, per_class, np.nan))),
        "IoU": [float(x) if ok else None for x, ok in zip(per_class, present, strict=True)],
        "items": len(dataset),
    }


def format_table(result: dict, class_names: list[str]) -> str:
    lines = ["| class | IoU (%) |", "|---|---|"]
    for name, iou in zip(class_names, result["IoU"], strict=True):
        lines.append(f"| {name} | {'-' if iou is None else f'{100 * iou:.2f}'} |")
    lines.append(f"| **mIoU** | **{100 * result['mIoU']:.2f}** |")
    lines.append(f"| aAcc | {100 * result['aAcc']:.2f} |")
    return "\n".join(lines)


# test.py's record of how a work dir's images were made (crfm.sampling.synthesis; its "segmentor": the guide)
SYNTHESIS_RECORD = "synthesis.json"
SCORER_NOTES = {
    "judge": "scored by an independent judge: this segmentor never guided these images",
    "guide": "scored by the CRFM guide that steered these images: inflated, not a fidelity measure (CRFM lowered "
    "this segmentor's loss on them); score with a segmentor that never guided sampling",
    "unknown": f"no {SYNTHESIS_RECORD} here: if this segmentor guided CRFM, the number is inflated",
}


def scorer_role(data_root: Path, mmseg_ckpt: str | Path) -> str:
    """`judge`, `guide` or `unknown`: whether the segmentor at `mmseg_ckpt` guided the sampling of `data_root`."""
    record = data_root / SYNTHESIS_RECORD
    if not record.is_file():
        return "unknown"
    guide = read_json(record, "the synthesis record").get("segmentor")
    return "guide" if guide is not None and Path(guide).resolve() == Path(mmseg_ckpt).resolve() else "judge"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.segmentation.evaluate", description=__doc__.split("\n\n")[0])
    add_data_flags(
        parser,
        "index.jsonl",
        "index of the pairs to score",
        num_cls="required",
        data_root_help="dataset (e.g. a test.py work dir) the index is in",
    )
    add_segmentor_flags(parser, required=True, purpose="of the judge (a training work dir's config.py)")
    parser.add_argument("--resolution", type=positive_int, default=None, help="resize (short side + centre crop) first")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per segmentor call")
    parser.add_argument("--out", default=None, help="JSON path (default <data_root>/mask_fidelity.json)")
    add_run_flags(parser, seed_help=None, device=True)
    return parser


def evaluate(args: argparse.Namespace) -> dict[str, object]:
    """Score the dataset of `args` with its segmentor, print the table, write the JSON; the result."""
    data_root = Path(args.data_root)
    items = read_index(data_root / args.json_file, data_root)  # before any model loads
    dataset = PairDataset(items, data_root, resolution=args.resolution, num_cls=args.num_cls)
    device = resolve_device(args.device)

    from crfm.segmentation.adapter import load_segmentor

    segmentor = load_segmentor(args.mmseg_config, args.mmseg_ckpt, device=device, num_cls=args.num_cls)
    result = mask_fidelity(segmentor, dataset, args.num_cls, args.batch_size, progress=not args.no_progress)
    names = list(segmentor.class_names or [f"class {i}" for i in range(args.num_cls)])
    result["classes"] = names
    role = scorer_role(data_root, args.mmseg_ckpt)
    result["scorer"] = {"role": role, "mmseg_config": str(args.mmseg_config), "mmseg_ckpt": str(args.mmseg_ckpt)}
    print(format_table(result, names))
    print(f"{args.mmseg_ckpt}: {SCORER_NOTES[role]}")
    out = Path(args.out) if args.out else data_root / "mask_fidelity.json"
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


main = entry_point(build_parser, evaluate)


if __name__ == "__main__":
    raise SystemExit(main())
