"""Turn a folder of images and class-index labels into our layout: `index.jsonl` (or a train/val split) with the
paper's prompts, optionally remapping label ids first (e.g. LoveDA's 0 = no-data, 1..7 = classes).

    python -m crfm.data.make_index data/loveda --images img --labels label --classes loveda \
        --remap 0:255,1:0,2:1,3:2,4:3,5:4,6:5,7:6 --val_fraction 0.1

Images and labels are paired by file stem (`img/0001.jpg` ↔ `label/0001.png`); unpaired files are counted and
named. Prompts follow `crfm.data.describe_label` ("a satellite image of " + the classes present, largest first).
`--classes` is a class file ({"classes": [...], "palette": [...], "ignore_index": 255}) or the name of one shipped
with the package (`crfm/data/classes/<name>.json`: loveda, from the dataset's own documentation); it is copied
beside the index as `classes.json`. With `--remap`, remapped labels are written as PNGs to `--remapped_dir`
(default `label_remapped/`) and the index points at them. Every label is read before anything is written, and the
run is refused in one line when the labels do not fit: an id the remap does not map, a class id the class file does
not list, or labels that already hold the class ids (a remap would then send a class with pixels to ignore and
leave another class empty: the LoveDA remap on labels already 0..6). The pixel histogram of the classes written is
printed.
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

CLASS_FILES = Path(__file__).resolve().parent / "classes"  # package data: the class files of the datasets docs name
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


def class_file(name_or_path: str | Path) -> Path:
    """`--classes`: a path to a class file, or the name of a shipped one (`loveda`)."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix == ".json" or len(path.parts) > 1:
        return path
    shipped = CLASS_FILES / f"{path.name}.json"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in CLASS_FILES.glob("*.json")))
        raise UsageError(f"--classes {name_or_path}: no such file, nor a shipped class list ({names})")
    return shipped


def _check_labels(
    labels: Path, counts: dict[Path, np.ndarray], class_names: list[str], remap: np.ndarray | None
) -> np.ndarray:
    """Every label's ids against the remap and the class list, before anything is written; the pixel count per
    class id (0..255) after the remap."""
    n = len(class_names)
    total = sum(counts.values())
    if remap is not None:
        for path, hist in counts.items():
            unmapped = np.flatnonzero((hist > 0) & (remap < 0))
            if unmapped.size:
                raise DatasetError(f"label {path} has id(s) {unmapped.tolist()} that --remap does not map")
        present = np.flatnonzero(total)
        mapped = np.bincount(remap[present], weights=total[present], minlength=256).astype(np.int64)
        dropped = [int(i) for i in present if remap[i] == IGNORE_INDEX and i < n]
        empty = [class_names[c] for c in range(n) if mapped[c] == 0]
        if dropped and empty and set(present.tolist()) <= {*range(n), IGNORE_INDEX}:
            shown = ", ".join(f"{i} ({total[i] / total.sum():.1%} of the pixels)" for i in dropped)
            raise DatasetError(
                f"{labels}: the labels already hold class ids 0..{n - 1} (ids present: {present.tolist()}); --remap "
                f"sends id {shown} to ignore and leaves {', '.join(empty)} without a pixel: leave --remap out"
            )
        total = mapped
    for path, hist in counts.items():
        ids = np.flatnonzero(hist) if remap is None else np.unique(remap[np.flatnonzero(hist)])
        bad = [int(i) for i in ids if n <= i != IGNORE_INDEX]
        if bad:
            raise DatasetError(
                f"label {path} has class id(s) {bad} but classes.json lists {n} classes (use --remap, and 255 for "
                "ignore)"
            )
    return total


def build_index(
    root: Path,
    images: str,
    labels: str,
    class_names: list[str],
    remap: np.ndarray | None = None,
    remapped_dir: str = "label_remapped",
    progress: bool = True,
) -> tuple[list[dict], list[Path], np.ndarray]:
    """Index records (paths relative to `root`) for every image/label pair, the unpaired files, and the pixels of
    each class id written (0..255). Labels are checked in a first pass, so a refused run writes nothing."""
    pairs, unpaired = pair_files(root / images, root / labels)
    if not pairs:
        raise DatasetError(f"no image/label pairs with matching file stems in {root / images} and {root / labels}")
    counts = {
        label_path: np.bincount(load_label(label_path).ravel(), minlength=256)
        for _, label_path in tqdm(pairs, desc="check labels", unit="label", leave=False, disable=not progress)
    }
    histogram = _check_labels(root / labels, counts, class_names, remap)
    records = []
    for image_path, label_path in tqdm(pairs, desc="index", unit="pair", disable=not progress):
        label = load_label(label_path)
        if remap is not None:
            label = remap[label].astype(np.uint8)
            label_path = root / remapped_dir / f"{label_path.stem}.png"
            with atomic_path(label_path) as tmp:
                Image.fromarray(label).save(tmp, format="PNG")
        records.append(
            {
                "source": label_path.relative_to(root).as_posix(),
                "target": image_path.relative_to(root).as_posix(),
                "prompt": describe_label(label, class_names),
            }
        )
    return records, unpaired, histogram


def format_histogram(histogram: np.ndarray, class_names: list[str]) -> str:
    """The pixels of each class written (and of ignore), as a table."""
    total = max(int(histogram.sum()), 1)
    rows = [(f"{i} {name}", int(histogram[i])) for i, name in enumerate(class_names)]
    rows.append((f"{IGNORE_INDEX} ignore", int(histogram[IGNORE_INDEX])))
    lines = ["| class | pixels | share |", "|---|---|---|"]
    lines += [f"| {name} | {pixels} | {pixels / total:.2%} |" for name, pixels in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.data.make_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset folder; the index paths are relative to it")
    parser.add_argument("--images", default="img", help="image sub-folder of root")
    parser.add_argument("--labels", default="label", help="label sub-folder of root (class-index PNGs)")
    parser.add_argument(
        "--classes",
        help="class file (classes.json) or the name of a shipped one: "
        + ", ".join(sorted(p.stem for p in CLASS_FILES.glob("*.json")))
        + " (default: <root>/classes.json)",
    )
    parser.add_argument("--remap", help="label id mapping SOURCE:TARGET,... (every id present must be listed)")
    parser.add_argument("--remapped_dir", default="label_remapped", help="sub-folder for remapped labels")
    parser.add_argument("--val_fraction", type=float, default=0.0, help="random share held out as val.jsonl")
    add_run_flags(parser, seed_help="seed of the train/val split")
    return parser


def make_index(args: argparse.Namespace) -> int:
    """Write index.jsonl (and train.jsonl/val.jsonl with --val_fraction) under args.root; 0 on success."""
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    classes_file = class_file(args.classes) if args.classes else args.root / CLASSES_FILE
    class_names = [str(c) for c in read_classes_json(classes_file)["classes"]]
    remap = parse_remap(args.remap) if args.remap else None
    records, unpaired, histogram = build_index(
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
    print(f"class histogram of the labels indexed ({classes_file}):\n{format_histogram(histogram, class_names)}")
    return 0


main = entry_point(build_parser, make_index)


if __name__ == "__main__":
    raise SystemExit(main())
