"""Index reading/validation and pair loading, on the real aerial samples and on broken inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfm.data.dataset import PairDataset, load_label
from crfm.data.index import IGNORE_INDEX, DatasetError, describe_label, read_index
from tests.helpers import REPO

# Class lists of the real samples, from ../shared/rs_samples/*/README.md.
SAMPLE_CLASSES = {
    "dubai_aerial": ("building", "land", "road", "vegetation", "water"),
    "loveda": ("background", "building", "road", "water", "barren", "forest", "agriculture"),
}


def test_real_samples_load(rs_samples):
    items = read_index(rs_samples / "index.jsonl")
    assert len(items) == 24
    dataset = PairDataset(items, rs_samples)
    seen = {name: set() for name in SAMPLE_CLASSES}
    for position, item in enumerate(items):
        sample = dataset[position]
        image, label = sample["image"], sample["label"]
        assert image.shape[0] == 3 and image.shape[1:] == label.shape
        assert -1.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        ids = set(torch.unique(label).tolist()) - {IGNORE_INDEX}
        num_cls = len(SAMPLE_CLASSES[item.record["dataset"]])
        assert ids and max(ids) < num_cls
        seen[item.record["dataset"]] |= ids
        assert sample["prompt"] == item.prompt
    assert seen["dubai_aerial"] == set(range(5))
    assert len(seen["loveda"]) >= 5


def test_prompt_rule_matches_the_real_samples(rs_samples):
    """describe_label reproduces the prompts that ship with the real data (a peer's rule, not ours)."""
    for item in read_index(rs_samples / "index.jsonl"):
        label = load_label(rs_samples / item.source)
        assert describe_label(label, SAMPLE_CLASSES[item.record["dataset"]]) == item.prompt, item.source


@pytest.mark.parametrize("resolution", [64, 48])
def test_resize_keeps_classes_and_squares_non_square_images(rs_samples, resolution):
    items = read_index(rs_samples / "index.jsonl")
    dubai = next(i for i in items if i.record["dataset"] == "dubai_aerial")
    with Image.open(rs_samples / dubai.target) as img:
        assert img.size[0] != img.size[1]  # the real tiles are not square
    sample = PairDataset([dubai], rs_samples, resolution=resolution, num_cls=5)[0]
    assert sample["image"].shape == (3, resolution, resolution)
    assert sample["label"].shape == (resolution, resolution) and sample["label"].dtype == torch.int64
    original = set(np.unique(load_label(rs_samples / dubai.source)).tolist())
    assert set(torch.unique(sample["label"]).tolist()) <= original  # nearest resize invents no class


def test_demo_folder_is_a_valid_dataset():
    demo = REPO / "demo"
    classes = json.loads((demo / "classes.json").read_text())["classes"]
    items = read_index(demo / "index.jsonl")
    assert len(items) >= 6
    real = [i for i in items if i.record.get("dataset") == "dubai_aerial"]
    assert real and len(real) < len(items)  # real and toy pairs both present
    dataset = PairDataset(items, demo, resolution=64, num_cls=len(classes))
    for position, item in enumerate(items):
        dataset[position]
        assert item.prompt == describe_label(load_label(demo / item.source), classes)


def _write_index(root: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for position, raw in (raw_lines or {}).items():
        lines.insert(position, raw)
    (root / "index.jsonl").write_text("\n".join(lines) + "\n\n")  # trailing blank lines are fine
    return root / "index.jsonl"


def test_index_errors_name_every_bad_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "m.png")
    good = {"source": "m.png", "target": "a.png", "prompt": "x"}
    index = _write_index(
        tmp_path,
        [good, {"source": "m.png", "target": "a.png"}, good, {"source": "m.png", "target": "b.png", "prompt": "y"}],
        raw_lines={1: "{oops"},
    )
    with pytest.raises(DatasetError) as err:
        read_index(index)
    message = str(err.value)
    assert "3 bad line(s)" in message
    assert "index.jsonl:2: invalid JSON" in message
    assert "index.jsonl:3: missing key(s) 'prompt'" in message
    assert "index.jsonl:5: file(s) not found" in message and "b.png" in message


def test_prompts_alias_and_extra_keys_are_kept(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "m.png")
    index = _write_index(tmp_path, [{"source": "m.png", "target": "a.png", "prompts": "old key", "city": "Wuhan"}])
    (item,) = read_index(index)
    assert item.prompt == "old key" and item.record["city"] == "Wuhan" and item.line == 1


def test_label_checks(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match="single-channel"):
        load_label(tmp_path / "colour.png")
    label = np.zeros((4, 4), np.uint8)
    label[0, 0], label[1, 1] = 7, IGNORE_INDEX
    Image.fromarray(label).save(tmp_path / "ids.png")
    assert load_label(tmp_path / "ids.png", num_cls=8)[0, 0] == 7
    with pytest.raises(DatasetError, match=r"\[7\] >= num_cls=5"):
        load_label(tmp_path / "ids.png", num_cls=5)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_label(tmp_path / "broken.png")


def test_dataset_errors_name_the_item(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (6, 8)).save(tmp_path / "m.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    index = _write_index(
        tmp_path,
        [
            {"source": "m.png", "target": "a.png", "prompt": "x"},
            {"source": "m.png", "target": "bad.jpg", "prompt": "x"},
        ],
    )
    dataset = PairDataset(read_index(index), tmp_path)
    with pytest.raises(DatasetError, match=r"index.jsonl:1 \(a.png\): image size \(8, 8\) differs"):
        dataset[0]
    with pytest.raises(DatasetError, match=r"index.jsonl:2 \(bad.jpg\): \S*bad.jpg: cannot read image"):
        dataset[1]
