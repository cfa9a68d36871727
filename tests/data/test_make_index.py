"""crfm.data.make_index: folders of images and labels -> our index layout, with prompts, remapping and a split."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crfm.data.dataset import load_label
from crfm.data.index import describe_label, read_index
from crfm.data.make_index import main, parse_remap

CLASSES = ["building", "road", "water"]


def _dataset(root: Path, n: int = 10) -> Path:
    """LoveDA-like: labels 0 = no-data, 1..3 = classes; JPEG images, one unpaired image and one unpaired label."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i:03d}.jpg")
        label = rng.integers(0, 4, (16, 16), dtype=np.uint8)
        label[:, : i % 3] = 3  # give classes different areas, so prompts differ
        Image.fromarray(label).save(root / "label" / f"{i:03d}.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "img" / "orphan.jpg")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "label" / "lonely.png")
    classes = root / "meta" / "classes.json"
    classes.parent.mkdir()
    classes.write_text(json.dumps({"classes": CLASSES, "palette": [[1, 1, 1]] * 3, "ignore_index": 255}))
    return classes


def test_remap_split_and_prompts(tmp_path, capsys):
    classes = _dataset(tmp_path)
    argv = [str(tmp_path), "--classes", str(classes), "--remap", "0:255,1:0,2:1,3:2", "--val_fraction", "0.3"]
    assert main([*argv, "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 file(s)" in out and "orphan.jpg" in out and "lonely.png" in out
    items = read_index(tmp_path / "index.jsonl")  # validates every line and that the files exist
    assert [i.target for i in items] == [f"img/{i:03d}.jpg" for i in range(10)]
    for item in items:
        original = load_label(tmp_path / "label" / Path(item.target).with_suffix(".png").name)
        remapped = load_label(tmp_path / item.source, num_cls=3)
        assert item.source.startswith("label_remapped/")
        np.testing.assert_array_equal(remapped, np.array([255, 0, 1, 2], np.uint8)[original])
        assert item.prompt == describe_label(remapped, CLASSES)
    train, val = read_index(tmp_path / "train.jsonl"), read_index(tmp_path / "val.jsonl")
    assert (len(train), len(val)) == (7, 3)
    assert {i.target for i in train} | {i.target for i in val} == {i.target for i in items}
    assert json.loads((tmp_path / "classes.json").read_text())["classes"] == CLASSES  # copied beside the index
    # The split is seeded: the same command gives the same split.
    assert main([*argv, "--no_progress"]) == 0
    assert [i.target for i in read_index(tmp_path / "val.jsonl")] == [i.target for i in val]


def _error_line(capsys) -> str:
    """The one line a failed run writes (on stderr, nothing on stdout)."""
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    return captured.err.strip()


def test_unmapped_or_out_of_range_ids_are_named(tmp_path, capsys):
    classes = _dataset(tmp_path, n=2)
    assert main([str(tmp_path), "--classes", str(classes), "--remap", "0:255,1:0,2:1", "--no_progress"]) == 2
    assert re.fullmatch(r"error: .*000.png has id\(s\) \[3\] that --remap does not map", _error_line(capsys))
    assert main([str(tmp_path), "--classes", str(classes), "--no_progress"]) == 2  # ids 0..3 without remap
    assert re.fullmatch(r"error: .*class id\(s\) \[3\] but classes.json lists 3 classes.*", _error_line(capsys))
    assert not (tmp_path / "index.jsonl").exists()


def test_bad_inputs_are_one_error_line(tmp_path, capsys):
    classes = _dataset(tmp_path, n=2)
    assert main([str(tmp_path), "--classes", str(classes), "--val_fraction", "1"]) == 2
    assert _error_line(capsys) == "error: --val_fraction must be in [0, 1), got 1.0"
    assert main([str(tmp_path / "missing"), "--classes", str(classes), "--no_progress"]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and str(tmp_path / "missing") in line
    assert main([str(tmp_path), "--remap", "0-1", "--classes", str(classes)]) == 2
    assert _error_line(capsys) == "error: bad --remap entry '0-1': expected SOURCE:TARGET integers"


def test_parse_remap_rejects_bad_entries():
    assert parse_remap("0:255, 1:0")[[0, 1, 2]].tolist() == [255, 0, -1]
    for bad in ("0-1", "0:256", "a:b"):
        with pytest.raises(ValueError, match="bad --remap entry"):
            parse_remap(bad)


def test_remap_on_labels_already_remapped_is_refused(rs_samples, tmp_path, capsys):
    """The LoveDA remap on labels that already hold class ids 0..6 (the samples' own) would turn background into
    ignore and every class into the next one: refused in one line, nothing written."""
    shutil.copytree(rs_samples / "loveda", tmp_path / "loveda")
    argv = [str(tmp_path / "loveda"), "--classes", "loveda", "--remap", "0:255,1:0,2:1,3:2,4:3,5:4,6:5,7:6"]
    assert main([*argv, "--no_progress"]) == 2
    line = _error_line(capsys)
    assert re.fullmatch(
        r"error: .*loveda/label: the labels already hold class ids 0\.\.6 \(ids present: \[0, 1, 2, 3, 5, 6\]\); "
        r"--remap sends id 0 \(\d+\.\d% of the pixels\) to ignore and leaves water, agriculture without a pixel: "
        r"leave --remap out",
        line,
    ), line
    assert sorted(p.name for p in (tmp_path / "loveda").iterdir()) == ["README.md", "img", "label"]
    # Without the remap the same labels index as they are, and the histogram counts what was written.
    assert main([str(tmp_path / "loveda"), "--classes", "loveda", "--no_progress"]) == 0
    out = capsys.readouterr().out
    labels = [load_label(p) for p in sorted((tmp_path / "loveda" / "label").glob("*.png"))]
    counts = np.bincount(np.concatenate([label.ravel() for label in labels]), minlength=256)
    assert f"| 6 agriculture | {counts[6]} |" in out and "| 4 barren | 0 | 0.00% |" in out


def test_a_bad_label_late_in_the_folder_leaves_nothing_written(tmp_path, capsys):
    classes = _dataset(tmp_path, n=4)
    label = load_label(tmp_path / "label" / "003.png")
    label[0, 0] = 9  # an id the remap does not map, in the last pair
    Image.fromarray(label).save(tmp_path / "label" / "003.png")
    assert main([str(tmp_path), "--classes", str(classes), "--remap", "0:255,1:0,2:1,3:2", "--no_progress"]) == 2
    assert re.fullmatch(r"error: .*003.png has id\(s\) \[9\] that --remap does not map", _error_line(capsys))
    assert not (tmp_path / "label_remapped").exists() and not (tmp_path / "index.jsonl").exists()


def test_unknown_class_list_name_is_one_line(tmp_path, capsys):
    _dataset(tmp_path, n=2)
    assert main([str(tmp_path), "--classes", "lovedaa", "--no_progress"]) == 2
    assert _error_line(capsys) == "error: --classes lovedaa: no such file, nor a shipped class list (loveda)"
