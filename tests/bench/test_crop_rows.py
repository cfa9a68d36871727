"""bench/crop_rows.py: a scene drawn without its crop rows differs from the written scene by the rows alone."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from crfm.toy import toydata
from tests.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    """bench/crop_rows.py (bench scripts are not a package)."""
    return load_script("bench/crop_rows.py")


def test_scene_without_rows_differs_on_farmland_only(bench):
    differing = 0
    for index in range(4):
        image, without, label = bench.scene_pair(seed=3, index=index, size=128)
        written, written_label = toydata.generate_scene(3, index, 128)
        assert (image == written).all() and (label == written_label).all()  # the first draw is the world's own
        changed = (image != without).any(axis=-1)
        # Roads and roofs are painted over the ground afterwards: every changed pixel is farmland.
        assert (label[changed] == toydata.FARM).all()
        # The rows are a sinusoid of a parcel's tone: they move pixels both ways, about evenly.
        step = image.astype(float).mean(-1)[changed] - without.astype(float).mean(-1)[changed]
        assert abs(step.mean()) < 0.2 * np.abs(step).mean()
        differing += int(changed.sum())
    assert differing > 0  # some parcel of these scenes has rows


def test_scene_without_rows_has_no_row_left(bench, monkeypatch):
    """With no amplitude the rows' period and phase must not matter: draw them differently, get the same image."""
    _, without, _ = bench.scene_pair(seed=3, index=1, size=128)
    texture = toydata._texture
    signature = inspect.signature(texture)

    def other_rows(*args, **kwargs):
        rows = signature.bind(*args, **kwargs).arguments
        rows["stripe_period"], rows["stripe_phase"] = 2 * rows["stripe_period"], rows["stripe_phase"] + 1.0
        rows["stripe_amp"] = np.zeros_like(rows["stripe_amp"])
        return texture(**rows)

    monkeypatch.setattr(toydata, "_texture", other_rows)
    assert (toydata.generate_scene(3, 1, 128)[0] == without).all()


def test_laplacian_energy_is_zero_on_a_ramp_and_counts_pixels(bench):
    ramp = np.add.outer(np.arange(8.0), np.arange(8.0))
    where = np.zeros((8, 8), bool)
    where[2:6, 2:6] = True
    assert bench.laplacian_energy(ramp, where) == (0.0, 16)
    stripes = np.tile([1.0, -1.0], (8, 4))  # period 2 across: the Laplacian of each inner pixel is -+4
    total, count = bench.laplacian_energy(stripes, where)
    assert (total, count) == (16 * 16.0, 16)
