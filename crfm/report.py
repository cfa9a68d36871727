"""`python -m crfm.report`: what a researcher looks at after the recipe, from its work folders.

    python -m crfm.report --synth_root work_dirs/synth_loveda \
        --runs "real only=work_dirs/seg_real" "real + CRFM=work_dirs/seg_real_synth" \
        --fidelity work_dirs/synth_loveda/mask_fidelity_judge.json --out work_dirs/report

Writes into `--out`:
- `contact_sheet.png`: synthetic images beside their masks (the first `--max_images` of the synthetic index),
  with a legend of the class colours;
- `report.md` (also printed): each downstream run's IoU per class, mIoU and aAcc (%, from its `metrics.json`),
  the change of each against the first run (the real-only baseline), the real and synthetic training images and
  iterations, and the mask fidelity of the synthetic set, each with who scored it (an independent judge or the CRFM
  guide, whose score is inflated).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image

from crfm.data.dataset import load_image, load_label
from crfm.data.index import CLASSES_FILE, read_classes_json, read_index
from crfm.models.conditioning import class_palette
from crfm.segmentation.evaluate import SCORER_NOTES
from crfm.utils.errors import UsageError
from crfm.utils.fileio import read_json, write_text_atomic
from crfm.utils.flags import entry_point, positive_int
from crfm.utils.viz import class_legend, colourise_mask, image_grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--synth_root", type=Path, help="a synthesized dataset (test.py's work dir): the contact sheet")
    parser.add_argument("--synth_file", default="index.jsonl", help="its index, relative to --synth_root")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[],
        metavar="NAME=WORK_DIR",
        help="downstream work dirs (scripts/train_segmentor.py's), the first the baseline the others are compared to",
    )
    parser.add_argument(
        "--fidelity", nargs="+", default=[], type=Path, help="mask_fidelity JSON files (crfm.segmentation.evaluate)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for contact_sheet.png and report.md")
    parser.add_argument("--max_images", type=positive_int, default=24, help="synthetic pairs on the contact sheet")
    parser.add_argument("--columns", type=positive_int, default=6, help="image-mask pairs per row of the sheet")
    return parser


def parse_runs(specs: list[str]) -> dict[str, Path]:
    """`NAME=WORK_DIR` pairs, each work dir holding a finished run's metrics.json."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.rpartition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--runs {spec}: expected NAME=WORK_DIR")
        if not (Path(folder) / "metrics.json").is_file():
            raise UsageError(f"--runs {spec}: no metrics.json in {folder} (has the run finished?)")
        runs[name] = Path(folder)
    return runs


def _percent(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def _change(value: object, base: object) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (value, base)):
        return "-"
    return f"{float(value) - float(base):+.2f}"


def runs_table(runs: dict[str, Path], class_names: list[str]) -> str:
    """IoU per class (%), mIoU, aAcc and the data of each run; every run after the first also as a change."""
    metrics = {name: read_json(folder / "metrics.json", "a run's metrics") for name, folder in runs.items()}
    names = list(runs)
    base = names[0]
    header = ["", *names, *(f"{name} − {base}" for name in names[1:])]
    keys = [(f"IoU {c}", f"IoU.{c}") for c in class_names] + [("**mIoU**", "mIoU"), ("aAcc", "aAcc")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, key in keys:
        values = [_percent(metrics[n].get(key)) for n in names]
        changes = [_change(metrics[n].get(key), metrics[base].get(key)) for n in names[1:]]
        lines.append("| " + " | ".join([label, *values, *changes]) + " |")
    for label, key in (("real / synthetic images", None), ("iterations", "iters")):
        if key is None:
            values = [f"{metrics[n].get('real_train')} / {metrics[n].get('synthetic_train')}" for n in names]
        else:
            values = [str(metrics[n].get(key)) for n in names]
        lines.append("| " + " | ".join([label, *values, *([""] * (len(names) - 1))]) + " |")
    if not class_names:
        lines.append(
            f"\nNo IoU per class: {base}'s config evaluates with mmseg's IoUMetric; `PerClassIoUMetric` "
            "(crfm.segmentation.mmseg_ext) reports it."
        )
    return "\n".join(lines)


def fidelity_lines(paths: list[Path]) -> str:
    """One line per mask-fidelity file: mIoU and aAcc (%) and who scored them."""
    lines = []
    for path in paths:
        result = read_json(path, "a mask-fidelity result")
        role = (result.get("scorer") or {}).get("role", "unknown")
        lines.append(
            f"- `{path}`: mIoU {100 * result['mIoU']:.2f}, aAcc {100 * result['aAcc']:.2f} "
            f"({result['items']} images); {SCORER_NOTES[role]}"
        )
    return "\n".join(lines)


def contact_sheet(synth_root: Path, synth_file: str, max_images: int, columns: int):
    """Synthetic image | colourised mask pairs, `columns` pairs a row, and the class legend under them."""
    items = read_index(synth_root / synth_file, synth_root)[:max_images]
    meta = read_classes_json(synth_root / CLASSES_FILE)
    names = [str(c) for c in meta["classes"]]
    palette = meta.get("palette") or class_palette(len(names))
    pairs = [
        [load_image(synth_root / item.target), colourise_mask(load_label(synth_root / item.source), palette)]
        for item in items
    ]
    size = max(image.width for image, _ in pairs)
    rows = [sum(pairs[i : i + columns], []) for i in range(0, len(pairs), columns)]
    grid = image_grid(rows, titles=["image", "mask"] * min(columns, len(pairs)), cell=size)
    legend = class_legend(names, palette, grid.width)
    sheet = Image.new("RGB", (grid.width, grid.height + 8 + legend.height), (255, 255, 255))
    sheet.paste(grid, (0, 0))
    sheet.paste(legend, (0, grid.height + 8))
    return sheet


def report(args: argparse.Namespace) -> int:
    """Write the contact sheet and report.md into --out; print the report."""
    runs = parse_runs(args.runs)
    for path in args.fidelity:
        if not path.is_file():
            raise UsageError(f"--fidelity {path}: no such file")
    if args.synth_root is None and not runs and not args.fidelity:
        raise UsageError("--runs, --fidelity or --synth_root: nothing to report")
    sections = []
    if args.synth_root is not None:
        if not (args.synth_root / args.synth_file).is_file():
            raise UsageError(f"--synth_root: no index at {args.synth_root / args.synth_file}")
        sheet = contact_sheet(args.synth_root, args.synth_file, args.max_images, args.columns)
        args.out.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out / "contact_sheet.png")
        sections.append(f"![synthetic images and their masks](contact_sheet.png)\n\n`{args.synth_root}`")
    if runs:
        classes = _run_classes(next(iter(runs.values())))
        sections.append("## Downstream (real validation split, %)\n\n" + runs_table(runs, classes))
    if args.fidelity:
        sections.append("## Mask fidelity of the synthetic set\n\n" + fidelity_lines(args.fidelity))
    text = "# Recipe report\n\n" + "\n\n".join(sections) + "\n"
    write_text_atomic(args.out / "report.md", text)
    print(text)
    print(f"wrote {args.out / 'report.md'}" + (f" and {args.out / 'contact_sheet.png'}" if args.synth_root else ""))
    return 0


def _run_classes(work_dir: Path) -> list[str]:
    """A run's class names, from its segmentor's metrics keys (`IoU.<class>`) in their order."""
    metrics = read_json(work_dir / "metrics.json", "a run's metrics")
    return [key.removeprefix("IoU.") for key in metrics if key.startswith("IoU.")]


main = entry_point(build_parser, report)


if __name__ == "__main__":
    raise SystemExit(main())
