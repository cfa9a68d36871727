"""Plot helpers: loss-curve PNGs, exact image-grid geometry, palette colouring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from crfm.data.index import IGNORE_INDEX
from crfm.toy.toydata import PALETTE, colourise
from crfm.utils.fileio import TMP_MARKER
from crfm.utils.viz import colourise_mask, ema, image_grid, needs_log_scale, plot_loss_curve


def test_ema_matches_hand_computation():
    # m_t = .5*v_t + .5*m_{t-1}, m = 0 before: .5, 1.75, 1.875, 5.9375; divided by 1 - .5^t: .5, .75, .875, .9375
    assert np.allclose(ema([1.0, 3.0, 2.0, 10.0], 0.5), [1.0, 1.75 / 0.75, 1.875 / 0.875, 5.9375 / 0.9375])
    # alpha .25: m = .25, 1.4375, .578125; divided by .25, .4375, .578125
    assert np.allclose(ema([1, 5, -2], 0.25), [1.0, 1.4375 / 0.4375, 1.0])
    assert np.allclose(ema([3.0] * 5, 0.05), 3.0)  # bias correction: a constant series is its own average
    assert ema([4.0, 7.0, 1.0], 1.0).tolist() == [4.0, 7.0, 1.0]  # alpha 1: no smoothing
    assert ema([], 0.3).shape == (0,)


def test_ema_skips_non_finite_values():
    out = ema([math.nan, 2.0, math.inf, 4.0], 0.5)
    assert math.isnan(out[0])  # nothing seen yet
    # the inf spike is held over, not averaged in: m = 1 (n=1) -> 2.0, held, then m = .5*4 + .5*1 = 2.5 (n=2) -> 2.5/.75
    assert np.allclose(out[1:], [2.0, 2.0, 2.5 / 0.75])


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_ema_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ema([1.0], alpha)


def test_needs_log_scale():
    assert needs_log_scale([2.0, 1.0, 0.1])  # 20x
    assert not needs_log_scale([2.0, 1.0, 0.5])  # 4x
    assert not needs_log_scale([2.0, 0.0, 0.01])  # zero cannot go on a log axis
    assert not needs_log_scale([math.nan])


def _loss_records(count: int, with_lr: bool) -> list[dict]:
    records = []
    for step in range(count):
        record = {"step": step, "loss": 2.0 * math.exp(-step / 20) + 0.02 * (step % 3)}
        if with_lr:
            record["lr"] = 1e-4 * min(1.0, (step + 1) / 10)
        records.append(record)
    return records


@pytest.mark.parametrize(("count", "with_lr"), [(100, True), (100, False), (1, True), (1, False)])
def test_plot_loss_curve_writes_png(tmp_path, count, with_lr):
    out = plot_loss_curve(_loss_records(count, with_lr), tmp_path / "plots" / "loss.png", title="run 1")
    assert out == tmp_path / "plots" / "loss.png" and out.is_file()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (700, 400)  # figsize 7x4 at 100 dpi
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas
    assert (pixels[..., 0] < 100).any()  # blue lines or black text/axes
    assert not [p for p in out.parent.iterdir() if TMP_MARKER in p.name]  # atomic write left no temporary


def test_plot_loss_curve_overwrites_and_sorts(tmp_path):
    out = tmp_path / "loss.png"
    out.write_bytes(b"stale")
    records = _loss_records(30, with_lr=True)
    plot_loss_curve(records[::-1], out)  # out of order, as after a resume
    with Image.open(out) as image:
        assert image.size == (700, 400)


def test_plot_loss_curve_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no loss records"):
        plot_loss_curve([], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def _solid(colour: tuple[int, int, int], width: int = 16, height: int = 16) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


COLOURS = [[(200, 0, 0), (0, 200, 0), (0, 0, 200)], [(10, 10, 10), (100, 50, 0), (0, 100, 100)]]


def test_image_grid_geometry_is_exact():
    grid = image_grid([[_solid(c) for c in row] for row in COLOURS], gap=4)
    assert grid.size == (3 * 16 + 2 * 4, 2 * 16 + 1 * 4)
    pixels = np.asarray(grid)
    for r, row in enumerate(COLOURS):
        for c, colour in enumerate(row):
            x0, y0 = c * (16 + 4), r * (16 + 4)
            assert (pixels[y0 : y0 + 16, x0 : x0 + 16] == colour).all(), (r, c)
    assert (pixels[:, 16:20] == 255).all()  # column gap is white
    assert (pixels[16:20, :] == 255).all()  # row gap is white
    assert image_grid([[_solid((1, 2, 3))]], gap=7).size == (16, 16)  # no outer margin


def test_image_grid_resizes_cells_and_accepts_arrays():
    rows = [
        [np.full((16, 16, 3), 90, np.uint8), np.full((12, 20), 30, np.uint8)],
        [np.ones((16, 16), np.float32), np.zeros((16, 16), bool)],
    ]
    grid = image_grid(rows, cell=10, gap=2)
    assert grid.size == (2 * 10 + 2, 2 * 10 + 2)
    pixels = np.asarray(grid)
    assert (pixels[0:10, 0:10] == 90).all()
    assert (pixels[0:10, 12:22] == 30).all()  # a non-square grey array, resized to the square cell
    assert (pixels[12:22, 0:10] == 255).all()  # float 1.0 -> white
    assert (pixels[12:22, 12:22] == 0).all()  # False -> black


def test_image_grid_ragged_rows_and_mixed_sizes():
    grid = image_grid([[_solid((0, 0, 0), 8, 8), _solid((0, 0, 0), 16, 12)], [_solid((0, 0, 0), 16, 16)]], gap=4)
    assert grid.size == (2 * 16 + 4, 2 * 16 + 4)  # slots take the largest cell: 16 wide, 16 high
    pixels = np.asarray(grid)
    assert (pixels[4:12, 4:12] == 0).all() and (pixels[0:4, 0:16] == 255).all()  # 8px cell centred in its slot
    assert (pixels[20:36, 20:36] == 255).all()  # the missing cell stays white


def test_image_grid_titles_add_a_header_strip():
    rows = [[_solid(c) for c in row] for row in COLOURS]
    plain = image_grid(rows, gap=4)
    titled = image_grid(rows, titles=["image", "mask", "a very long title that must be cut"], gap=4)
    header = titled.height - plain.height
    assert titled.width == plain.width and header > 4
    pixels = np.asarray(titled)
    assert (pixels[:header] < 128).any()  # dark title text in the strip
    assert np.array_equal(pixels[header:], np.asarray(plain))  # the cells just move down by the strip
    # A title is cut to its column: nothing dark in the gap between columns.
    assert (pixels[:header, 16:20] == 255).all() and (pixels[:header, 36:40] == 255).all()
    with pytest.raises(ValueError, match="titles"):
        image_grid(rows, titles=["a", "b", "c", "d"])


def test_image_grid_rejects_empty():
    with pytest.raises(ValueError, match="at least one cell"):
        image_grid([[], []])


def test_colourise_mask_uses_palette():
    palette = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    label = np.array([[0, 1, 2], [IGNORE_INDEX, 7, 1]], np.uint8)
    rgb = colourise_mask(label, palette)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb.tolist() == [[[10, 20, 30], [40, 50, 60], [70, 80, 90]], [[0, 0, 0], [0, 0, 0], [40, 50, 60]]]
    # Same result for wider integer types, and the same as toydata's own colouring with its PALETTE.
    assert np.array_equal(colourise_mask(label.astype(np.int64), palette), rgb)
    toy = np.array([[0, 1, 2, 3], [4, 5, IGNORE_INDEX, 0]], np.uint8)
    assert np.array_equal(colourise_mask(toy, PALETTE), colourise(toy))


def test_colourise_mask_rejects_bad_input():
    palette = [(0, 0, 0)]
    with pytest.raises(ValueError, match="integer"):
        colourise_mask(np.zeros((2, 2), np.float32), palette)
    with pytest.raises(ValueError, match="0..255"):
        colourise_mask(np.array([[-1, 0]]), palette)
    with pytest.raises(ValueError, match="0..255"):
        colourise_mask(np.array([[256]]), palette)
    with pytest.raises(ValueError, match="RGB triples"):
        colourise_mask(np.zeros((2, 2), np.uint8), [(0, 0)])
    with pytest.raises(ValueError, match="at most"):
        colourise_mask(np.zeros((2, 2), np.uint8), [(0, 0, 0)] * 256)
