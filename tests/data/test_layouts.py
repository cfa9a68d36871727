"""crfm.data.layouts: 2 x 2 mosaics of turned and flipped crops of the labelled masks, with prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from crfm.data.dataset import load_label
from crfm.data.index import describe_label, read_index
from crfm.data.layouts import main

CLASSES = ["soil", "farmland", "water", "road"]
SIZE = 24


def _labelled(root: Path, n: int = 5) -> None:
    """Masks of random classes; each image pixel records (source, row, column), so a cut can be traced back."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    rows, cols = np.mgrid[:SIZE, :SIZE]
    lines = []
    for i in range(n):
        label = rng.integers(0, len(CLASSES), (SIZE, SIZE), dtype=np.uint8)
        label[0, 0] = 255  # an ignore pixel, kept as ignore wherever it lands
        image = np.stack([np.full_like(rows, i), rows, cols], axis=-1).astype(np.uint8)
        Image.fromarray(label).save(root / "label" / f"{i}.png")
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"source": f"label/{i}.png", "target": f"img/{i}.png", "prompt": "p"}) + "\n")
    (root / "train.jsonl").write_text("".join(lines))
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "ignore_index": 255}))


def _run(root: Path, out: Path, *extra: str) -> int:
    argv = ["--data_root", str(root), "--json_file", "train.jsonl", "--work_dir", str(out), "--no_progress"]
    return main([*argv, "--num_layouts", "12", *extra])


def test_tiles_are_oriented_crops_of_labelled_pairs(tmp_path):
    _labelled(tmp_path / "data")
    assert _run(tmp_path / "data", tmp_path / "mosaic", "--with_images") == 0
    sources = [load_label(tmp_path / "data" / "label" / f"{i}.png") for i in range(5)]
    items = read_index(tmp_path / "mosaic" / "index.jsonl")
    assert len(items) == 12
    orientations = set()
    for item in items:
        label = load_label(tmp_path / "mosaic" / item.source)
        trace = np.asarray(Image.open(tmp_path / "mosaic" / item.target)).astype(int)
        source, row, col = trace[..., 0], trace[..., 1], trace[..., 2]
        # Image and mask were cut together: every pixel's label is its source pixel's label.
        assert (label == np.stack(sources)[source, row, col]).all()
        assert item.prompt == describe_label(label, CLASSES)
        # Four tiles, cut in the middle half of each side; each one source, rigidly turned or flipped.
        steps_down = np.abs(np.diff(row, axis=0)) + np.abs(np.diff(col, axis=0))
        steps_right = np.abs(np.diff(row, axis=1)) + np.abs(np.diff(col, axis=1))
        cut_ys = np.flatnonzero((steps_down != 1).any(axis=1) | (np.diff(source, axis=0) != 0).any(axis=1))
        cut_xs = np.flatnonzero((steps_right != 1).any(axis=0) | (np.diff(source, axis=1) != 0).any(axis=0))
        assert len(cut_ys) <= 1 and len(cut_xs) <= 1  # a crop of the same source may continue across a cut
        for cut in (*cut_ys, *cut_xs):
            assert SIZE // 4 <= cut + 1 <= 3 * SIZE // 4
        down, right = (row[1, 0] - row[0, 0], col[1, 0] - col[0, 0]), (row[0, 1] - row[0, 0], col[0, 1] - col[0, 0])
        orientations.add((down, right))
    assert len(orientations) >= 4  # turns and flips are drawn, not one fixed orientation


def test_same_seed_same_layouts_and_images_do_not_change_the_masks(tmp_path):
    _labelled(tmp_path / "data")
    _run(tmp_path / "data", tmp_path / "a")
    _run(tmp_path / "data", tmp_path / "b")
    _run(tmp_path / "data", tmp_path / "c", "--with_images")
    _run(tmp_path / "data", tmp_path / "d", "--seed", "1")
    masks = {name: [p.read_bytes() for p in sorted((tmp_path / name / "label").iterdir())] for name in "abcd"}
    assert masks["a"] == masks["b"] == masks["c"]
    assert masks["a"] != masks["d"]
    # Without images a line's target is its own mask: synthesis reads the masks only.
    assert all(item.target == item.source for item in read_index(tmp_path / "a" / "index.jsonl"))
    assert not (tmp_path / "a" / "img").exists()
    assert (tmp_path / "a" / "classes.json").read_text() == (tmp_path / "data" / "classes.json").read_text()


def test_without_class_names_one_error_line_and_no_index(tmp_path, capsys):
    _labelled(tmp_path / "data")
    (tmp_path / "data" / "classes.json").unlink()
    assert _run(tmp_path / "data", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classes.json" in err[0]
    assert not (tmp_path / "out" / "index.jsonl").exists()
