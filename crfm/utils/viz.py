"""Small plotting helpers: training-loss curves, image grids and colourised label maps.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), so nothing here touches matplotlib's
global backend or figure registry and the helpers are safe in headless training jobs and worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crfm.utils.constants import IGNORE_INDEX
from crfm.utils.fileio import atomic_path

WHITE = (255, 255, 255)


def ema(values: Sequence[float], alpha: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as Adam's moments).

    m_t = alpha * v_t + (1 - alpha) * m_{t-1} with m = 0 before the first value, reported as m_t / (1 - (1 - alpha)^n)
    after n finite values: an early outlier does not dominate the start of the curve as it would with m_0 = v_0.
    Non-finite values (a NaN/inf loss spike) are skipped, i.e. the average holds its last value; leading
    non-finite values stay NaN.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    out = np.full(len(values), np.nan, dtype=np.float64)
    moment, seen = 0.0, 0
    for index, value in enumerate(values):
        value = float(value)
        if math.isfinite(value):
            moment = alpha * value + (1.0 - alpha) * moment
            seen += 1
        if seen:
            out[index] = moment / (1.0 - (1.0 - alpha) ** seen)
    return out


def needs_log_scale(values: Sequence[float]) -> bool:
    """True when the positive finite values span more than one decade (a log axis then shows the tail)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or (finite <= 0).any():
        return False  # log scale cannot show zero or negative losses
    return bool(finite.max() / finite.min() > 10.0)


def _default_alpha(count: int) -> float:
    # Smooth over about 5% of the run (at least a few steps), like a window of that many points.
    span = max(4, count // 20)
    return 2.0 / (span + 1)


def plot_loss_curve(
    records: list[dict],
    out_png: str | Path,
    title: str = "training loss",
    ema_alpha: float | None = None,
) -> Path:
    """Plot raw loss (thin), its EMA (thick) and, if any record has "lr", the learning rate on a twin axis."""
    from matplotlib.figure import Figure

    if not records:
        raise ValueError("no loss records to plot")
    records = sorted(records, key=lambda r: r["step"])  # resumed runs may append out of order
    steps = [r["step"] for r in records]
    losses = [float(r["loss"]) for r in records]
    smooth = ema(losses, ema_alpha if ema_alpha is not None else _default_alpha(len(losses)))
    marker = "o" if len(records) == 1 else None  # a single point has no line to draw

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", lw=0.8, alpha=0.35, marker=marker, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=2.0, marker=marker, label="loss (EMA)")
    if needs_log_scale(losses):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()

    lr_records = [r for r in records if r.get("lr") is not None]
    if lr_records:
        lr_ax = ax.twinx()
        lr_ax.plot(
            [r["step"] for r in lr_records],
            [float(r["lr"]) for r in lr_records],
            color="tab:orange",
            lw=1.2,
            ls="--",
            marker=marker,
            label="learning rate",
        )
        lr_ax.set_ylabel("learning rate")
        lr_max = max(float(r["lr"]) for r in lr_records)
        if lr_max > 0:
            lr_ax.set_ylim(0.0, 1.3 * lr_max)  # headroom so a flat lr after warm-up does not run under the legend
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    fig.tight_layout()

    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def _to_image(cell: Image.Image | np.ndarray) -> Image.Image:
    """PIL image or array (H×W or H×W×C; uint8, bool, or float in [0, 1]) -> RGB PIL image."""
    if isinstance(cell, Image.Image):
        return cell.convert("RGB")
    array = np.asarray(cell)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"grid cells must be H×W or H×W×C arrays, got shape {array.shape}")
    return Image.fromarray(array).convert("RGB")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Shorten `text` with '...' until it fits `width` pixels, so titles never spill into the next column."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def image_grid(
    rows: list[list[Image.Image | np.ndarray]],
    titles: list[str] | None = None,
    cell: int | None = None,
    gap: int = 4,
    resample: Image.Resampling = Image.Resampling.NEAREST,
) -> Image.Image:
    """Paste cells into a white canvas, row by row, with `gap` pixels between cells and no outer margin.

    Canvas size: width = cols * cell_w + (cols - 1) * gap, height = header + n_rows * cell_h + (n_rows - 1) * gap,
    where cell_w/cell_h are `cell` if given (every cell resized to a `cell` px square) else the largest cell
    width/height (smaller cells are centred in their slot), and header is 0 without `titles`, else a strip of
    text height plus `gap` with one title centred over each column. Rows may be ragged: missing cells stay white.
    `resample` defaults to NEAREST so colourised masks keep crisp class borders when resized.
    """
    images = [[_to_image(item) for item in row] for row in rows]
    n_rows, n_cols = len(images), max((len(row) for row in images), default=0)
    if n_cols == 0:
        raise ValueError("image_grid needs at least one cell")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if titles is not None and len(titles) > n_cols:
        raise ValueError(f"{len(titles)} titles for {n_cols} columns")
    if cell is not None:
        images = [[image.resize((cell, cell), resample) for image in row] for row in images]
        cell_w = cell_h = cell
    else:
        cell_w = max(image.width for row in images for image in row)
        cell_h = max(image.height for row in images for image in row)

    font = ImageFont.load_default()
    # A fixed reference string, so the strip height does not depend on the words (descenders, capitals).
    _, text_top, _, text_bottom = font.getbbox("Ag")
    header = (text_bottom - text_top) + 2 + gap if titles else 0

    width = n_cols * cell_w + (n_cols - 1) * gap
    height = header + n_rows * cell_h + (n_rows - 1) * gap
    canvas = Image.new("RGB", (width, height), WHITE)
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            x = c * (cell_w + gap) + (cell_w - image.width) // 2
            y = header + r * (cell_h + gap) + (cell_h - image.height) // 2
            canvas.paste(image, (x, y))

    if titles:
        draw = ImageDraw.Draw(canvas)
        for c, title in enumerate(titles):
            text = _fit_text(draw, str(title), font, cell_w)
            x = c * (cell_w + gap) + (cell_w - draw.textlength(text, font=font)) / 2
            draw.text((x, 1 - text_top), text, fill=(0, 0, 0), font=font)
    return canvas


def colourise_mask(label: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Class-index map [H, W] -> uint8 RGB [H, W, 3] with palette[k] for class k.

    Ignore pixels (255) and ids without a palette entry are black. Raises ValueError for non-integer labels or
    ids outside 0..255, which a lookup table would otherwise wrap around or reject with an IndexError.
    """
    colours = np.asarray(palette, dtype=np.int64) if len(palette) else np.zeros((0, 3), np.int64)
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"palette must be a sequence of RGB triples, got shape {colours.shape}")
    if len(colours) > IGNORE_INDEX:
        raise ValueError(f"palette has {len(colours)} colours; at most {IGNORE_INDEX} (id {IGNORE_INDEX} is ignore)")
    if ((colours < 0) | (colours > 255)).any():
        raise ValueError("palette colours must be RGB triples in 0..255")
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer array, got {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label ids must be in 0..255, got {label.min()}..{label.max()}")
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colours)] = colours
    lut[IGNORE_INDEX] = 0
    return lut[label.astype(np.intp)]


def class_legend(
    names: Sequence[str], palette: Sequence[tuple[int, int, int]], width: int, swatch: int = 10
) -> Image.Image:
    """A white strip `width` px wide: a colour swatch and the name of each class, wrapped onto as many lines as
    needed, and ignore (black) last."""
    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Ag")
    line = max(swatch, bottom - top) + 4
    entries = [*zip(names, palette, strict=False), ("ignore", (0, 0, 0))]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [swatch + 4 + int(probe.textlength(str(name), font=font)) + 12 for name, _ in entries]
    places, x, y = [], 0, 0
    for entry_width in widths:
        if x and x + entry_width > width:
            x, y = 0, y + line
        places.append((x, y))
        x += entry_width
    canvas = Image.new("RGB", (width, y + line), WHITE)
    draw = ImageDraw.Draw(canvas)
    for (name, colour), (x, y) in zip(entries, places, strict=True):
        draw.rectangle(
            (x, y + 2, x + swatch - 1, y + 1 + swatch), fill=tuple(int(v) for v in colour), outline=(0, 0, 0)
        )
        draw.text((x + swatch + 4, y + 2 - top), str(name), fill=(0, 0, 0), font=font)
    return canvas


def plot_fidelity_vs_nfe(
    series: dict[str, list[dict]], out_png: str | Path, title: str = "mask fidelity vs sampling cost"
) -> Path:
    """Judge mIoU (%) against NFE per model: `series` maps a model's name to its runs (dicts with `nfe`, `mIoU`,
    optional `mIoU_std` for error bars and `run` labels); log-scaled NFE axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, runs in series.items():
        runs = sorted(runs, key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in runs]
        miou = [100 * r["mIoU"] for r in runs]
        errors = [100 * r.get("mIoU_std", 0.0) for r in runs]
        ax.errorbar(nfe, miou, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("function evaluations per image (NFE)")
    ax.set_ylabel("judge mIoU (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png
