"""bench/layout_gap.py: the real mosaics written again at the generator's resolution read back as they were."""

from __future__ import annotations

import pytest
import torch

from crfm.data.dataset import PairDataset
from crfm.data.index import CLASSES_FILE, read_index
from crfm.toy.toydata import write_dataset
from tests.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    """bench/layout_gap.py (bench scripts are not a package)."""
    return load_script("bench/layout_gap.py")


def test_written_pairs_read_back_as_the_resized_set(bench, tmp_path):
    index = write_dataset(tmp_path / "real", 3, 128, seed=5, progress=False)
    items = read_index(index)
    resized = PairDataset(items, tmp_path / "real", resolution=64, num_cls=6)
    out = tmp_path / "written"
    bench.write_pairs(resized, items, tmp_path / "real" / CLASSES_FILE, out)

    written = PairDataset(read_index(out / "index.jsonl"), out, num_cls=6)  # no resizing on the way back
    assert len(written) == len(resized)
    for position in range(len(resized)):
        before, after = resized[position], written[position]
        assert after["image"].shape == (3, 64, 64) and after["prompt"] == before["prompt"]
        assert torch.equal(after["label"], before["label"])  # ignore pixels (255) included
        assert (after["image"] - before["image"]).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding only
    assert (out / CLASSES_FILE).read_bytes() == (tmp_path / "real" / CLASSES_FILE).read_bytes()
