"""Turn a folder of images and class-index labels into our layout: `index.jsonl` (or a train/val split) with the
paper's prompts, optionally remapping label ids first (e.g. LoveDA's 0 = no-data, 1..7 = classes).

    python -m crfm.data.make_index data/loveda --images img --labels label --classes data/loveda/classes.json \
        --remap 0:255,1:0,2:1,3:2,4:3,5:4,6:5,7:6 --val_fraction 0.1

Images and labels are paired by file stem (`img/0001.jpg` ↔ `label/0001.png`); unpaired files are counted and
named. Prompts follow `crfm.data.describe_label` ("a satellite image of " + the classes present, largest first).
With `--remap`, remapped labels are written as PNGs to `--remapped_dir` (default `label_remapped/`) and the index
points at them; ids a remap does not mention are an error, so nothing is silently kept. Every label is checked
against the class count of `classes.json` ({"classes": [...], "palette": [...], "ignore_index": 255}).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from crfm.data.dataset import load_label
from crfm.data.index import CLASSES_FILE, IGNORE_INDEX, DatasetError, describe_label, read_classes_json
from crfm.utils.fileio import atomic_path, write_jsonl_atomic, write_text_atomic
from crfm.utils.flags import UsageError, add_run_flags, entry_point

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def parse_remap(text: str) -> np.ndarray:
    """Parse SOURCE:TARGET pairs ("0:255,1:0,...") into a 256-entry lookup table; ids not listed map to -1."""
    table = np.full(256, -1, dtype=np.int16)
    for pair in filter(None, (p.strip() for p in text.split(","))):
        try:
            source, target = (int(v) for v in pair.split(":"))
        except ValueError as exc:
            raise ValueError(f"bad --remap entry {pair!r}: expected SOURCE:TARGET integers") from exc
        if not (0 <= source <= 255 and 0 <= target <= 255):
            raise ValueError(f"bad --remap entry {pair!r}: ids must be in 0..255")
        table[source] = target
    return table


def pair_files(images: Path, labels: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, label) pairs by stem, sorted; and the files without a partner."""
    image_files = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    label_files = {p.stem: p for p in labels.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs = [(image_files[s], label_files[s]) for s in sorted(image_files.keys() & label_files.keys())]
    unpaired = sorted(image_files[s] for s in image_files.keys() - label_files.keys())
    unpaired += sorted(label_files[s] for s in label_files.keys() - image_files.keys())
    return pairs, unpaired


def build_index(
    root: Path,
    images: str,
    labels: str,
    class_names: list[str],
    remap: np.ndarray | None = None,
    remapped_dir: str = "label_remapped",
    progress: bool = True,
) -> tuple[list[dict], list[Path]]:
    """Index records (paths relative to `root`) for every image/label pair, and the unpaired files."""
    pairs, unpaired = pair_files(root / images, root / labels)
    if not pairs:
        raise DatasetError(f"no image/label pairs with matching file stems in {root / images} and {root / labels}")
    records = []
    for image_path, label_path in tqdm(pairs, desc="index", unit="pair", disable=not progress):
        label = load_label(label_path)
        if remap is not None:
            mapped = remap[label]
            if (mapped < 0).any():
                missing = np.unique(label[mapped < 0]).tolist()
                raise DatasetError(f"label {label_path} has id(s) {missing} that --remap does not map")
            label = mapped.astype(np.uint8)
            label_path = root / remapped_dir / f"{label_path.stem}.png"
            with atomic_path(label_path) as tmp:
                Image.fromarray(label).save(tmp, format="PNG")
        bad = np.unique(label[(label >= len(class_names)) & (label != IGNORE_INDEX)])
        if bad.size:
            raise DatasetError(
                f"label {label_path} has class id(s) {bad.tolist()} but classes.json lists {len(class_names)} "
                "classes (use --remap, and 255 for ignore)"
            )
        records.append(
            {
                "source": label_path.relative_to(root).as_posix(),
                "target": image_path.relative_to(root).as_posix(),
                "prompt": describe_label(label, class_names),
            }
        )
    return records, unpaired


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.data.make_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset folder; the index paths are relative to it")
    parser.add_argument("--images", default="img", help="image sub-folder of root")
    parser.add_argument("--labels", default="label", help="label sub-folder of root (class-index PNGs)")
    parser.add_argument("--classes", type=Path, help="classes.json (default: <root>/classes.json)")
    parser.add_argument("--remap", help="label id mapping SOURCE:TARGET,... (every id present must be listed)")
    parser.add_argument("--remapped_dir", default="label_remapped", help="sub-folder for remapped labels")
    parser.add_argument("--val_fraction", type=float, default=0.0, help="random share held out as val.jsonl")
    add_run_flags(parser, seed_help="seed of the train/val split")
    return parser


def make_index(args: argparse.Namespace) -> int:
    """Write index.jsonl (and train.jsonl/val.jsonl with --val_fraction) under args.root; 0 on success."""
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    classes_file = args.classes or args.root / CLASSES_FILE
    class_names = [str(c) for c in read_classes_json(classes_file)["classes"]]
    remap = parse_remap(args.remap) if args.remap else None
    records, unpaired = build_index(
        args.root, args.images, args.labels, class_names, remap, args.remapped_dir, not args.no_progress
    )
    if classes_file.resolve() != (args.root / CLASSES_FILE).resolve():  # the layout wants it beside the index
        write_text_atomic(args.root / CLASSES_FILE, classes_file.read_text(encoding="utf-8"))
    if unpaired:
        shown = ", ".join(str(p) for p in unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
        print(f"skipped {len(unpaired)} file(s) without a partner: {shown}")
    outputs = {"index.jsonl": records}
    if args.val_fraction > 0:
        order = list(range(len(records)))
        random.Random(args.seed).shuffle(order)
        n_val = max(1, round(args.val_fraction * len(records)))
        held_out = set(order[:n_val])
        outputs["train.jsonl"] = [r for i, r in enumerate(records) if i not in held_out]
        outputs["val.jsonl"] = [r for i, r in enumerate(records) if i in held_out]
    for name, lines in outputs.items():
        write_jsonl_atomic(args.root / name, lines)
        print(f"wrote {args.root / name}: {len(lines)} pairs")
    return 0


main = entry_point(build_parser, make_index)


if __name__ == "__main__":
    raise SystemExit(main())
