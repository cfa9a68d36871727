"""FreeMask-style filtering of synthetic pairs: the pixels a segmentor trained on real data finds too hard to
believe become "ignore".

    python -m crfm.segmentation.filter --data_root data/loveda --json_file train.jsonl --num_cls 7 \
        --mmseg_config work_dirs/seg_real/config.py --mmseg_ckpt work_dirs/seg_real/segmentor.pth \
        --synth_root work_dirs/synth_loveda --work_dir work_dirs/synth_loveda_filtered [--tolerance_margin 1.25]

(also `crfm-filter`). A synthetic image does not draw its mask faithfully everywhere, and a segmentor trained on
such pixels learns wrong labels. FreeMask (Yang et al., NeurIPS 2023) measures, with a segmentor trained on the
real set, each class's mean per-pixel cross-entropy over the real images; a synthetic pixel whose loss exceeds
`--tolerance_margin` times the mean of its mask's class is set to 255 (ignored by the loss). A class absent from the
real set has no mean: its synthetic pixels are kept (the report says so).

`--views N` averages the segmentor's class probabilities over N dihedral views of each image (1: the image as is;
2: and its mirror image; 4: its quarter turns; 8: both) before the loss, for the real means and the synthetic pixels
alike. CRFM pushes a synthetic image toward what its guide predicts in the one view it sees, and much of that push
does not survive a quarter turn (bench/results_crfm_gap.md); when the guide also filters, averaging over views keeps
the filter from trusting what CRFM made it believe.

`--work_dir` becomes a dataset in crfm's layout that `python -m crfm.segmentation.downstream --synth_root` takes:
`label/` (the filtered masks), `img/` (hard links to the synthetic images, or copies across file systems; the
originals are never modified or moved), `index.jsonl` (the synthetic index lines, `source` on the filtered mask,
`filtered_fraction` added), `classes.json`, `filter_report.json` (per-class real mean loss, synthetic and filtered
pixels) and `class_losses.json` (the real-set means, cached with the inputs they came from). Resumable: every mask
is written atomically before its record goes to `filter.records.jsonl`, so a re-run skips finished items and
recomputes the totals from the records; items filtered with another margin or other class means are redone.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from crfm.data.dataset import PairDataset, check_index_pairs
from crfm.data.index import CLASSES_FILE, IGNORE_INDEX, IndexItem, read_classes_json
from crfm.segmentation.views import VIEW_COUNTS, dihedral_views, predict_in_view
from crfm.utils.fileio import (
    append_records,
    atomic_path,
    read_records,
    remove_stale_temporaries,
    write_jsonl_atomic,
    write_text_atomic,
)
from crfm.utils.flags import (
    UsageError,
    add_data_flags,
    add_run_flags,
    add_segmentor_flags,
    entry_point,
    positive_float,
    positive_int,
    resolve_device,
)

CLASS_LOSSES = "class_losses.json"
RECORDS = "filter.records.jsonl"
REPORT = "filter_report.json"
ABSENT_NOTE = "no real pixels of this class, so no mean loss: its synthetic pixels are kept"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.segmentation.filter", description=__doc__.split("\n\n")[0])
    add_data_flags(
        parser, "index.jsonl", "real labelled index (the class mean losses)", data_root_help="real dataset root"
    )
    add_segmentor_flags(parser, required=True, purpose="of a segmentor trained on the real set")
    parser.add_argument("--synth_root", required=True, help="synthesized dataset root (a test.py work dir)")
    parser.add_argument("--synth_file", default="index.jsonl", help="synthesized index, relative to --synth_root")
    parser.add_argument("--work_dir", required=True, help="output dataset (filtered masks, index.jsonl, report)")
    parser.add_argument(
        "--tolerance_margin",
        type=positive_float,
        default=1.25,
        help="a synthetic pixel is ignored when its loss exceeds this times its class's real mean loss (> 0)",
    )
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="resize the real pairs (short side + centre crop) first, e.g. to the synthesis --resolution; "
        "synthetic pairs are scored at their own size",
    )
    parser.add_argument(
        "--views",
        type=int,
        choices=VIEW_COUNTS,
        default=1,
        help="dihedral views the segmentor's probabilities are averaged over before the loss (1: the image as is)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per segmentor call")
    add_run_flags(parser, seed_help=None, device=True)
    return parser


@dataclass
class ClassLosses:
    """A segmentor's cross-entropy over a labelled set, pixels keyed by their label's class."""

    loss_sum: np.ndarray  # float64 [num_cls]
    pixels: np.ndarray  # int64 [num_cls]
    item_pixels: np.ndarray  # int64 [items, num_cls]: each label's pixels per class (the hardness weights)

    def means(self) -> list[float | None]:
        """Mean loss per class; None for a class with no labelled pixel."""
        return [float(s / n) if n else None for s, n in zip(self.loss_sum, self.pixels, strict=True)]


def _device(module: torch.nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def pixel_losses(
    segmentor: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, views: int = 1
) -> torch.Tensor:
    """Per-pixel cross-entropy [B, H, W] (CPU, float32) of the segmentor vs `labels`; 0 where 255. With `views`
    > 1, of its class probabilities averaged over that many dihedral views."""
    device = _device(segmentor)
    images, labels = images.to(device), labels.to(device)
    if views == 1:
        logits = segmentor(images).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").cpu()
    probabilities = torch.stack([
        predict_in_view(segmentor, images, turns, mirror).float().softmax(dim=1)
        for turns, mirror in dihedral_views(views)
    ]).mean(dim=0)  # fmt: skip
    log_probabilities = probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()
    return F.nll_loss(log_probabilities, labels, ignore_index=IGNORE_INDEX, reduction="none").cpu()


def batches(dataset: PairDataset, positions: Iterable[int], batch_size: int) -> Iterator[list[dict]]:
    """The samples at `positions`, in order, up to `batch_size` at a time; a batch also ends where the image size
    changes (images kept at their own size cannot be stacked)."""
    batch: list[dict] = []
    for position in positions:
        sample = dataset[position]
        if batch and (len(batch) == batch_size or sample["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def batch_losses(segmentor: torch.nn.Module, batch: list[dict], views: int = 1) -> np.ndarray:
    images = torch.stack([s["image"] for s in batch])
    return pixel_losses(segmentor, images, torch.stack([s["label"] for s in batch]), views).double().numpy()


def class_counts(labels: np.ndarray, num_cls: int) -> np.ndarray:
    """Pixels per class (255 not counted), int64 [num_cls]."""
    valid = labels[labels != IGNORE_INDEX]
    return np.bincount(valid.ravel(), minlength=num_cls)[:num_cls].astype(np.int64)


def class_mean_losses(
    segmentor: torch.nn.Module, dataset: PairDataset, num_cls: int, batch_size: int = 8, progress: bool = True,
    views: int = 1,
) -> ClassLosses:  # fmt: skip
    """Sum and pixel count of the per-pixel cross-entropy per class (of the label) over every item of `dataset`
    (`views`: as `pixel_losses`)."""
    from tqdm.auto import tqdm

    losses = ClassLosses(np.zeros(num_cls), np.zeros(num_cls, np.int64), np.zeros((len(dataset), num_cls), np.int64))
    bar = tqdm(total=len(dataset), desc="real class losses", unit="img", disable=not progress)
    for batch in batches(dataset, range(len(dataset)), batch_size):
        for sample, loss in zip(batch, batch_losses(segmentor, batch, views), strict=True):
            label = sample["label"].numpy()
            valid = label != IGNORE_INDEX
            losses.loss_sum += np.bincount(label[valid], weights=loss[valid], minlength=num_cls)[:num_cls]
            losses.item_pixels[sample["position"]] = class_counts(label, num_cls)
        bar.update(len(batch))
    bar.close()
    losses.pixels = losses.item_pixels.sum(axis=0)
    return losses


def thresholds(class_means: Sequence[float | None], margin: float) -> np.ndarray:
    """Loss limit per label value [256]: margin x class mean; +inf (always kept) for 255 and classes without a mean."""
    limits = np.full(IGNORE_INDEX + 1, np.inf)
    for cls, mean in enumerate(class_means):
        if mean is not None:
            limits[cls] = margin * mean
    return limits


def filter_label(label: np.ndarray, losses: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """`label` (uint8 HxW) with every pixel whose loss exceeds its class's limit set to 255."""
    return np.where(losses > limits[label], IGNORE_INDEX, label).astype(np.uint8)


def link_or_copy(source: Path, destination: Path) -> None:
    """`destination` as a hard link to `source` (no extra space), else a copy; atomic, `source` untouched."""
    with atomic_path(destination) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)


def output_paths(item: IndexItem) -> tuple[str, str]:
    """(label, image) of a synthetic item in the work dir, relative to it: same names, under label/ and img/."""
    return f"label/{Path(item.source).with_suffix('.png').name}", f"img/{Path(item.target).name}"


@dataclass(frozen=True)
class FilterTarget:
    """Where filtered items go and what they are filtered with."""

    work_dir: Path
    synth_root: Path
    limits: np.ndarray  # per label value, from `thresholds`
    num_cls: int
    key: str  # `settings_key`: recorded with each item, so a re-run with other settings redoes it


def filter_item(target: FilterTarget, item: IndexItem, sample: dict, losses: np.ndarray) -> dict:
    """Write one item's filtered mask and image link; its record (index line, per-class counts) for the shard."""
    label = sample["label"].numpy().astype(np.uint8)
    filtered = filter_label(label, losses, target.limits)
    source, image = output_paths(item)
    with atomic_path(target.work_dir / source) as tmp:
        Image.fromarray(filtered).save(tmp)
    link_or_copy(target.synth_root / item.target, target.work_dir / image)
    counts = class_counts(label, target.num_cls)
    dropped = class_counts(label[(filtered == IGNORE_INDEX) & (label != IGNORE_INDEX)], target.num_cls)
    labelled = int(counts.sum())
    return {
        "unit": item.target,
        "settings": target.key,
        "counts": counts.tolist(),
        "filtered": dropped.tolist(),
        "record": {
            **item.record,
            "source": source,
            "target": image,
            "filtered_fraction": float(dropped.sum() / labelled) if labelled else 0.0,
        },
    }


def finished_items(work_dir: Path, key: str) -> dict[str, dict]:
    """Finished items (unit -> record): made with the settings `key`, and their files still there (a record cut by
    a kill or a full disk is dropped by `read_records`, so its item is redone)."""
    done: dict[str, dict] = {}
    for record in read_records(work_dir / RECORDS):
        files = (record["record"]["source"], record["record"]["target"])
        if record.get("settings") == key and all((work_dir / f).is_file() for f in files):
            done[record["unit"]] = record
    return done


def _stamp(path: str | Path) -> dict:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def class_loss_inputs(args: argparse.Namespace) -> dict:
    """What the real-set class means depend on; a cached mean is reused only for the same inputs."""
    return {
        "mmseg_config": _stamp(args.mmseg_config),
        "mmseg_ckpt": _stamp(args.mmseg_ckpt),
        "real_index": _stamp(Path(args.data_root) / args.json_file),
        "resolution": args.resolution,
        "num_cls": args.num_cls,
        **({"views": args.views} if args.views != 1 else {}),  # a cache from before --views existed: one view
    }


def cached_class_means(work_dir: Path, inputs: dict) -> list[float | None] | None:
    path = work_dir / CLASS_LOSSES
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return cached.get("class_mean_loss") if cached.get("inputs") == inputs else None


def check_args(args: argparse.Namespace) -> None:
    """Flags argparse cannot check, and the inputs' presence: before anything is loaded or written."""
    work_dir = Path(args.work_dir).resolve()
    for flag in ("data_root", "synth_root"):
        if work_dir == Path(getattr(args, flag)).resolve():
            raise UsageError(f"--work_dir must differ from --{flag} (the originals are never overwritten)")
    for flag, index_file in (
        ("--data_root", Path(args.data_root) / args.json_file),
        ("--synth_root", Path(args.synth_root) / args.synth_file),
    ):
        if not index_file.is_file():
            raise UsageError(f"{flag}: no index at {index_file}")
        classes = index_file.parent / CLASSES_FILE
        listed = len(read_classes_json(classes)["classes"]) if classes.is_file() else args.num_cls
        if listed != args.num_cls:
            raise UsageError(f"{classes} lists {listed} classes but --num_cls is {args.num_cls}")


def check_outputs(items: Sequence[IndexItem]) -> None:
    """Two synthetic items must not land on the same output file."""
    seen: dict[str, str] = {}
    for item in items:
        for path in output_paths(item):
            if path in seen:
                raise UsageError(f"{item.where()} and {seen[path]} would both be written to {path}")
            seen[path] = item.where()


def real_class_means(
    args: argparse.Namespace, segmentor: torch.nn.Module, items: Sequence[IndexItem], work_dir: Path
) -> list[float | None]:
    """The real set's class means: cached in the work dir for the same inputs, else computed and cached."""
    inputs = class_loss_inputs(args)
    means = cached_class_means(work_dir, inputs)
    if means is not None:
        return means
    dataset = PairDataset(items, args.data_root, resolution=args.resolution, num_cls=args.num_cls)
    losses = class_mean_losses(
        segmentor, dataset, args.num_cls, args.batch_size, progress=not args.no_progress, views=args.views
    )
    means = losses.means()
    cache = {
        "inputs": inputs,
        "class_mean_loss": means,
        "pixels": losses.pixels.tolist(),
        "loss_sum": losses.loss_sum.tolist(),
    }
    write_text_atomic(work_dir / CLASS_LOSSES, json.dumps(cache, indent=2) + "\n")
    return means


def settings_key(args: argparse.Namespace, class_means: Sequence[float | None]) -> str:
    """What a filtered mask depends on besides its own pair: a record made under another key is redone."""
    settings = {"tolerance_margin": args.tolerance_margin, "class_mean_loss": list(class_means)}
    if args.views != 1:  # records made before --views existed keep their key
        settings["views"] = args.views
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def filter_report(
    records: Sequence[dict], class_names: Sequence[str], class_means: Sequence[float | None], margin: float
) -> dict:
    """Per-class and overall synthetic / filtered pixel totals of the finished records."""
    num_cls = len(class_names)
    counts = np.sum([r["counts"] for r in records], axis=0) if records else np.zeros(num_cls, np.int64)
    dropped = np.sum([r["filtered"] for r in records], axis=0) if records else np.zeros(num_cls, np.int64)
    total = int(counts.sum())
    return {
        "classes": list(class_names),
        "tolerance_margin": margin,
        "items": len(records),
        "class_mean_loss": list(class_means),
        "synthetic_pixels": counts.astype(int).tolist(),
        "filtered_pixels": dropped.astype(int).tolist(),
        "filtered_fraction": [float(d / n) if n else None for d, n in zip(dropped, counts, strict=True)],
        "overall_filtered_fraction": float(dropped.sum() / total) if total else 0.0,
        "kept_without_real_mean": [
            name for name, mean, n in zip(class_names, class_means, counts, strict=True) if mean is None and n
        ],
        "note": f"a class with class_mean_loss null has {ABSENT_NOTE}",
    }


def format_report(report: dict) -> str:
    lines = [
        f"FreeMask filtering, tolerance margin {report['tolerance_margin']}, {report.get('views', 1)} view(s) "
        f"({report['items']} synthetic items)",
        "",
        "| class | real mean loss | synthetic px | filtered px | filtered (%) |",
        "|---|---|---|---|---|",
    ]
    rows = zip(
        report["classes"],
        report["class_mean_loss"],
        report["synthetic_pixels"],
        report["filtered_pixels"],
        report["filtered_fraction"],
        strict=True,
    )
    for name, mean, pixels, dropped, fraction in rows:
        mean_text = "– (no real pixels: kept)" if mean is None else f"{mean:.4f}"
        fraction_text = "–" if fraction is None else f"{100 * fraction:.2f}"
        lines.append(f"| {name} | {mean_text} | {pixels} | {dropped} | {fraction_text} |")
    total, dropped = sum(report["synthetic_pixels"]), sum(report["filtered_pixels"])
    lines.append(f"| **all** | | {total} | {dropped} | **{100 * report['overall_filtered_fraction']:.2f}** |")
    return "\n".join(lines)


def filter_synthetic(args: argparse.Namespace) -> dict:
    """Filter every synthetic pair not finished yet; write the index, classes and report; the report."""
    from tqdm.auto import tqdm

    check_args(args)
    data_root, synth_root, work_dir = Path(args.data_root), Path(args.synth_root), Path(args.work_dir)
    # Every pair opened (bad lines, colour masks, class ids >= num_cls named) before any model loads.
    real_items = check_index_pairs(data_root, args.json_file, args.num_cls, progress=not args.no_progress)
    synth_items = check_index_pairs(synth_root, args.synth_file, args.num_cls, progress=not args.no_progress)
    check_outputs(synth_items)

    from crfm.segmentation.adapter import load_segmentor

    segmentor = load_segmentor(args.mmseg_config, args.mmseg_ckpt, resolve_device(args.device), args.num_cls)
    class_means = real_class_means(args, segmentor, real_items, work_dir)  # the first write into the work dir
    limits = thresholds(class_means, args.tolerance_margin)
    target = FilterTarget(work_dir, synth_root, limits, args.num_cls, settings_key(args, class_means))
    for folder in ("img", "label"):
        remove_stale_temporaries(work_dir / folder)

    done = finished_items(work_dir, target.key)
    done_before = sum(item.target in done for item in synth_items)
    pending = [pos for pos, item in enumerate(synth_items) if item.target not in done]
    if pending:  # an index (and report) stands only for a finished run with these settings
        for name in ("index.jsonl", REPORT):
            (work_dir / name).unlink(missing_ok=True)
    dataset = PairDataset(synth_items, synth_root, num_cls=args.num_cls)  # at their own size: labels match images
    bar = tqdm(total=len(pending), desc="filter", unit="img", disable=args.no_progress or not pending)
    for batch in batches(dataset, pending, args.batch_size):
        records = [
            filter_item(target, synth_items[s["position"]], s, loss)
            for s, loss in zip(batch, batch_losses(segmentor, batch, args.views), strict=True)
        ]
        append_records(work_dir / RECORDS, records)  # after the files they stand for
        done.update((r["unit"], r) for r in records)
        bar.update(len(batch))
    bar.close()

    records = [done[item.target] for item in synth_items]
    write_jsonl_atomic(work_dir / "index.jsonl", [r["record"] for r in records])
    names = list(segmentor.class_names)
    for classes in (synth_root / CLASSES_FILE, data_root / CLASSES_FILE):
        if classes.is_file():
            write_text_atomic(work_dir / CLASSES_FILE, classes.read_text(encoding="utf-8"))
            names = list(read_classes_json(classes)["classes"])  # the dataset's names over the model's numbers
            break
    report = filter_report(records, names, class_means, args.tolerance_margin) | {"views": args.views}
    write_text_atomic(work_dir / REPORT, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"wrote {work_dir / 'index.jsonl'} ({done_before} items done before, {len(pending)} now) and {REPORT}")
    return {**report, "done_before": done_before, "filtered_now": len(pending)}


main = entry_point(build_parser, filter_synthetic)


if __name__ == "__main__":
    raise SystemExit(main())
