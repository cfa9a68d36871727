"""New label layouts cut from the labelled masks, so synthesis can draw scenes no labelled image shows.

    python -m crfm.data.layouts --data_root data/train --json_file train.jsonl --work_dir work_dirs/layouts \
        --num_layouts 48 --seed 0

Synthesizing several images of each labelled mask (the paper's x3) adds appearances but no new layouts: the
segmentor still sees only the labelled arrangements of fields, roads and rivers. Each layout here is a 2 x 2
mosaic: the mask is cut at a random point in the middle half of each side and each of the four tiles is filled
with a crop of a random labelled mask under a random quarter turn and flip (aerial scenes have no "up"). Its prompt
names the classes present, largest first (`describe_label`, the rule of `make_index`'s prompts), with the class
names of `classes.json` beside the index.

Writes `label/layout_NNNNN.png`, `classes.json` and, last, `index.jsonl` into `--work_dir`: an index that
vectorize and synthesis take like any other. Each line's `target` is its own mask (there is no image yet), unless
`--with_images` cuts the real images along with the masks: then it is a real-image mosaic, the augmentation-only
control that `downstream --synth_root` takes directly. The same flags always write the same files, so a re-run
reproduces a finished or interrupted one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from crfm.data.dataset import check_index_pairs, load_pair
from crfm.data.index import CLASSES_FILE, DatasetError, describe_label, read_classes_json
from crfm.utils.fileio import atomic_path, write_jsonl_atomic, write_text_atomic
from crfm.utils.flags import add_data_flags, add_run_flags, entry_point, positive_int

LABEL_DIR, IMAGE_DIR = "label", "img"


def oriented(array: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """`array` (H x W [x C]) turned by `turns` quarter turns, then mirrored left-right if `flip`."""
    out = np.rot90(array, turns)
    return out[:, ::-1] if flip else out


def mosaic(
    labels: list[np.ndarray], images: list[np.ndarray] | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """One 2 x 2 layout the size of a random labelled mask; with `images`, the matching image cut the same way."""
    height, width = labels[rng.integers(len(labels))].shape
    cut_y = int(rng.integers(height // 4, 3 * height // 4 + 1))
    cut_x = int(rng.integers(width // 4, 3 * width // 4 + 1))
    label = np.empty((height, width), np.uint8)
    image = None if images is None else np.empty((height, width, 3), np.uint8)
    for rows in (slice(0, cut_y), slice(cut_y, height)):
        for cols in (slice(0, cut_x), slice(cut_x, width)):
            tile_h, tile_w = rows.stop - rows.start, cols.stop - cols.start
            # Draw a source and orientation that holds the tile (all of them do when the masks share one size).
            for _ in range(100):
                source, turns, flip = int(rng.integers(len(labels))), int(rng.integers(4)), bool(rng.random() < 0.5)
                src_h, src_w = labels[source].shape[::-1] if turns % 2 else labels[source].shape
                if src_h >= tile_h and src_w >= tile_w:
                    break
            else:
                raise DatasetError(f"no labelled mask is large enough for a {tile_h} x {tile_w} px tile")
            top, left = int(rng.integers(src_h - tile_h + 1)), int(rng.integers(src_w - tile_w + 1))
            crop = (slice(top, top + tile_h), slice(left, left + tile_w))
            label[rows, cols] = oriented(labels[source], turns, flip)[crop]
            if image is not None and images is not None:
                image[rows, cols] = oriented(images[source], turns, flip)[crop]
    return label, image


def write_layouts(
    data_root: Path,
    json_file: str,
    work_dir: Path,
    num_layouts: int,
    seed: int,
    with_images: bool = False,
    progress: bool = True,
) -> Path:
    """Write `num_layouts` mosaics of the labelled masks (and images) and their index into `work_dir`."""
    classes_file = (data_root / json_file).parent / CLASSES_FILE
    if not classes_file.is_file():
        raise DatasetError(f"{classes_file} not found: layouts need the class names to write their prompts")
    class_names = [str(c) for c in read_classes_json(classes_file)["classes"]]
    items = check_index_pairs(data_root, json_file, len(class_names))  # every pair sound before any file is written
    pairs = [load_pair(data_root, item, len(class_names)) for item in items]
    labels = [label for _, label in pairs]
    images = [np.asarray(image) for image, _ in pairs] if with_images else None
    rng = np.random.default_rng(seed)
    records = []
    for number in tqdm(range(num_layouts), desc="layouts", unit="layout", disable=not progress):
        label, image = mosaic(labels, images, rng)
        name = f"layout_{number:05d}.png"
        with atomic_path(work_dir / LABEL_DIR / name) as tmp:
            Image.fromarray(label).save(tmp, format="PNG")
        target = f"{LABEL_DIR}/{name}"
        if image is not None:
            target = f"{IMAGE_DIR}/{name}"
            with atomic_path(work_dir / target) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        records.append(
            {"source": f"{LABEL_DIR}/{name}", "target": target, "prompt": describe_label(label, class_names)}
        )
    write_text_atomic(work_dir / CLASSES_FILE, classes_file.read_text(encoding="utf-8"))
    index = work_dir / "index.jsonl"
    write_jsonl_atomic(index, records)  # last: its presence means every file above is complete
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.data.layouts", description=__doc__.split("\n\n")[1])
    add_data_flags(parser, "index.jsonl", "the labelled pairs whose masks are cut", num_cls="none")
    parser.add_argument("--work_dir", type=Path, required=True, help="output folder (masks, classes.json, index)")
    parser.add_argument("--num_layouts", type=positive_int, default=48, help="layouts to write")
    parser.add_argument(
        "--with_images", action="store_true", help="cut the real images too: a real-image mosaic (the control)"
    )
    add_run_flags(parser, seed_help="seed of the cuts, sources, turns and crops")
    return parser


def run(args: argparse.Namespace) -> None:
    index = write_layouts(
        Path(args.data_root), args.json_file, args.work_dir, args.num_layouts, args.seed, args.with_images,
        not args.no_progress,
    )  # fmt: skip
    print(f"wrote {args.num_layouts} layouts: {index}")


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
