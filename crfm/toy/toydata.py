"""Seedable procedural toy remote-sensing segmentation dataset.

Scenes mimic agricultural / peri-urban land seen from a satellite: tilted field parcels, forest, a river
or lake, roads and settlements of buildings with shadows, plus an optional no-data swath edge. Each scene is
seen in one of several appearances (`STYLES`: region and season recolour the land cover, and the sensor adds
haze, gamma and a colour cast), as scenes from different regions, dates and sensors are in real archives: a
few labelled scenes cover a few appearances, an unlabelled corpus all of them. Within a scene the classes stay
apart by texture and context (crop rows, canopy, smooth water, straight roads, roofs with shadows), not by a
fixed colour. The appearance is drawn from its own random stream, so the layout of scene i does not depend on it.

Usage::

    python -m crfm.toy.toydata OUT --num 100 --size 256 [--seed 0] [--ignore_prob 0.3] [--workers 4]
    python -m crfm.toy.toydata --preview assets/toydata_preview.png
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from crfm.data.index import IGNORE_INDEX, describe_label
from crfm.utils.fileio import atomic_path, write_text_atomic
from crfm.utils.viz import colourise_mask

CLASSES: tuple[str, ...] = ("bare soil", "farmland", "forest", "water", "road", "building")
PALETTE: tuple[tuple[int, int, int], ...] = (
    (180, 130, 80),  # bare soil: brown
    (240, 225, 90),  # farmland: yellow
    (30, 140, 40),  # forest: green
    (40, 90, 220),  # water: blue
    (160, 160, 160),  # road: grey
    (220, 40, 40),  # building: red
)

RECIPE_FILE = "toydata.json"

SOIL, FARM, FOREST, WATER, ROAD, BUILDING = range(len(CLASSES))

_SOIL_COLOURS = np.array(
    [(168, 138, 104), (150, 116, 86), (186, 162, 128), (132, 106, 82), (176, 150, 110)], np.float32
)
_FARM_COLOURS = np.array(
    [(92, 124, 60), (128, 148, 72), (156, 160, 96), (74, 108, 54), (170, 156, 98), (110, 140, 70)],
    np.float32,
)
_FOREST_COLOURS = np.array([(44, 72, 40), (38, 64, 42), (52, 78, 44)], np.float32)
_WATER_COLOURS = np.array([(34, 54, 78), (30, 60, 70), (44, 64, 86)], np.float32)
_ROAD_COLOURS = np.array([(118, 118, 117), (132, 131, 128), (104, 104, 106), (142, 136, 126)], np.float32)
# Roofs are brighter than asphalt or clearly red, so buildings stand out from roads as in real imagery.
_ROOF_COLOURS = np.array(
    [(156, 78, 58), (176, 94, 70), (198, 198, 196), (222, 220, 214), (238, 238, 232), (128, 72, 60)],
    np.float32,
)


# Region / season appearances: per-class RGB multipliers of the temperate colour tables, in CLASSES order
# (soil, farmland, forest, water, road, building). Drawn uniformly per scene.
# fmt: off
STYLES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "temperate": ((1.0, 1.0, 1.0),) * 6,
    "arid": ((1.28, 1.15, 0.98), (1.55, 1.22, 0.82), (1.25, 1.12, 0.85), (1.05, 1.15, 1.05), (1.12, 1.1, 1.05),
             (1.0, 1.0, 1.0)),
    "autumn": ((0.95, 0.85, 0.8), (1.45, 1.0, 0.8), (2.5, 1.35, 0.65), (0.9, 0.95, 1.0), (1.0, 1.0, 1.0),
               (1.0, 1.0, 1.0)),
    "lush": ((0.72, 0.66, 0.62), (0.72, 1.28, 0.78), (0.8, 1.1, 0.85), (0.85, 1.05, 1.1), (0.95, 0.95, 0.95),
             (1.0, 1.0, 1.0)),
}
# fmt: on
_HAZE_COLOUR = np.array([172, 182, 196], np.float32)


def _appearance(seed: int, index: int) -> tuple[np.ndarray, float, float, np.ndarray]:
    """A scene's (per-class colour multipliers [6, 3], haze share, gamma, colour cast [3]) from its own stream."""
    rng = np.random.default_rng([seed, index, 1])
    names = sorted(STYLES)
    multipliers = np.array(STYLES[names[int(rng.integers(len(names)))]], np.float32)
    haze = float(rng.uniform(0.0, 0.35)) if rng.random() < 0.5 else 0.0
    gamma = float(rng.uniform(0.8, 1.25))
    cast = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    return multipliers, haze, gamma, cast


def _smooth(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise: a small random grid upsampled with bicubic resampling."""
    n = max(2, int(round(cells)))
    grid = rng.standard_normal((n, n)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _split_parcels(
    rng: np.random.Generator, half: float, size: int
) -> tuple[list[tuple[float, float, float, float]], list[tuple[int, float, int]]]:
    """Recursively split the square [-half, half]^2 (in the rotated u/v frame) into rectangular parcels.

    Returns the parcel rectangles (u0, u1, v0, v1) and the split lines (axis, coordinate, depth); shallow
    splits run across the whole scene and make good places for roads.
    """
    min_side = size * rng.uniform(0.08, 0.14)
    max_side = size * rng.uniform(0.25, 0.45)
    rects: list[tuple[float, float, float, float]] = []
    splits: list[tuple[int, float, int]] = []
    stack = [(-half, half, -half, half, 0)]
    while stack:
        u0, u1, v0, v1, depth = stack.pop()
        du, dv = u1 - u0, v1 - v0
        longest = max(du, dv)
        # Stop at a random size between min and max so neighbouring parcels differ in size.
        if longest < 2 * min_side or (longest < max_side and rng.random() < 0.5):
            rects.append((u0, u1, v0, v1))
            continue
        axis = 0 if du >= dv else 1
        frac = rng.uniform(0.3, 0.7)
        if axis == 0:
            c = u0 + frac * du
            splits.append((0, c, depth))
            stack += [(u0, c, v0, v1, depth + 1), (c, u1, v0, v1, depth + 1)]
        else:
            c = v0 + frac * dv
            splits.append((1, c, depth))
            stack += [(u0, u1, v0, c, depth + 1), (u0, u1, c, v1, depth + 1)]
    return rects, splits


class _Line:
    """A straight or gently sinusoidal line (road or river axis) in centred pixel coordinates."""

    def __init__(self, angle: float, offset: float, amp: float = 0.0, period: float = 1.0, phase: float = 0.0):
        self.angle, self.offset, self.amp, self.period, self.phase = angle, offset, amp, period, phase

    def curve(self, s: np.ndarray | float) -> np.ndarray | float:
        return self.offset + self.amp * np.sin(2 * np.pi * np.asarray(s) / self.period + self.phase)

    def coords(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(along-line s, signed across-line distance t) of each pixel."""
        c, s_ = math.cos(self.angle), math.sin(self.angle)
        s = x * c + y * s_
        t = -x * s_ + y * c - self.curve(s)
        return s, t

    def point(self, s: float, t: float) -> tuple[float, float]:
        """Pixel position (centred) of the point at along-line s and across-line offset t."""
        c, s_ = math.cos(self.angle), math.sin(self.angle)
        tt = float(self.curve(s)) + t
        return s * c - tt * s_, s * s_ + tt * c


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift a boolean mask by (dy, dx) without wrap-around."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def generate_scene(seed: int, index: int, size: int, ignore_prob: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Generate one scene: (RGB image uint8 HxWx3, label uint8 HxW with 255 = ignore).

    The RNG is keyed on (seed, index) only, so scene ``index`` is identical however many scenes are made.
    """
    rng = np.random.default_rng([seed, index])
    scale = size / 256.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x = xx + 0.5 - size / 2
    y = yy + 0.5 - size / 2

    # --- 1. parcels in a rotated frame --------------------------------------------------------------------
    theta = rng.uniform(-np.pi / 4, np.pi / 4)
    ct, st = math.cos(theta), math.sin(theta)
    u = x * ct + y * st
    v = -x * st + y * ct
    rects, splits = _split_parcels(rng, size / math.sqrt(2) + 1, size)
    n_parcels = len(rects)
    box = np.array(rects, np.float32)
    pid = np.zeros((size, size), np.int32)
    for i, (u0, u1, v0, v1) in enumerate(rects):
        pid[(u >= u0) & (u < u1) & (v >= v0) & (v < v1)] = i

    # Per-scene land-use mix so some scenes are forest-heavy and others mostly fields.
    mix = rng.dirichlet([2.0, 4.0, 1.5])
    parcel_cls = rng.choice([SOIL, FARM, FOREST], size=n_parcels, p=mix)
    label = parcel_cls[pid].astype(np.uint8)

    parcel_col = np.empty((n_parcels, 3), np.float32)
    for i, c in enumerate(parcel_cls):
        table = _SOIL_COLOURS if c == SOIL else _FARM_COLOURS
        # Brightness varies freely, hue only slightly, so soil never turns pink or blue.
        parcel_col[i] = table[rng.integers(len(table))] * rng.uniform(0.88, 1.12) * rng.uniform(0.97, 1.03, 3)
    # Crop rows run along the parcel's long side; period and contrast vary per parcel.
    long_u = (box[:, 1] - box[:, 0]) >= (box[:, 3] - box[:, 2])
    stripe_period = np.maximum(2.5, rng.uniform(3.0, 8.0, n_parcels) * scale)
    stripe_amp = rng.uniform(0.0, 0.16, n_parcels) * (rng.random(n_parcels) < 0.8)
    stripe_phase = rng.uniform(0, 2 * np.pi, n_parcels)

    # Irregular natural woodland overriding some parcels.
    if rng.random() < 0.5:
        wood = _smooth(rng, size, 3) + 0.5 * _smooth(rng, size, 9)
        label[wood > rng.uniform(0.7, 1.3)] = FOREST

    # --- 2. water ------------------------------------------------------------------------------------------
    water = np.zeros((size, size), bool)
    if rng.random() < 0.45:
        river = _Line(
            rng.uniform(0, np.pi),
            rng.uniform(-0.3, 0.3) * size,
            amp=size * rng.uniform(0.03, 0.12),
            period=size * rng.uniform(0.8, 2.0),
            phase=rng.uniform(0, 2 * np.pi),
        )
        s, t = river.coords(x, y)
        half_w = size * rng.uniform(0.02, 0.05) * (1 + 0.25 * _smooth(rng, size, 3))
        if rng.random() < 0.5:  # riparian woodland along the banks
            bank = half_w + size * rng.uniform(0.015, 0.04) * (1 + 0.6 * _smooth(rng, size, 6))
            label[(np.abs(t) < bank) & (label != FOREST)] = FOREST
        water |= np.abs(t) < half_w
    if rng.random() < 0.3:
        cx, cy = rng.uniform(-0.3, 0.3, 2) * size
        radius = size * rng.uniform(0.1, 0.22)
        field = 1 - np.hypot(x - cx, y - cy) / radius + 0.35 * _smooth(rng, size, 4) + 0.06 * _smooth(rng, size, 16)
        water |= field > 0
    label[water] = WATER

    # --- 3. roads ------------------------------------------------------------------------------------------
    road_id = np.full((size, size), -1, np.int8)
    roads: list[tuple[_Line, float, np.ndarray]] = []
    major = [sp for sp in splits if sp[2] <= 2 and abs(sp[1]) < 0.35 * size]
    for k in range(int(rng.integers(1, 4))):
        for _ in range(4):  # a few tries to find a road that does not run along a river
            if major and (k == 0 or rng.random() < 0.7):
                # Follow a parcel boundary: real roads usually run along field edges.
                axis, c, _ = major[rng.integers(len(major))]
                line = _Line(theta + np.pi / 2, -c) if axis == 0 else _Line(theta, c)
            else:
                axis, c = -1, 0.0
                line = _Line(theta + rng.uniform(0.3, np.pi - 0.3), rng.uniform(-0.3, 0.3) * size)
            if rng.random() < 0.4:
                line.amp = size * rng.uniform(0.02, 0.07)
                line.period = size * rng.uniform(1.2, 3.0)
                line.phase = rng.uniform(0, 2 * np.pi)
            half_w = max(1.0, size * rng.uniform(0.011, 0.02))  # 3-5 px at 128 px: visible at 64 px too
            s, t = line.coords(x, y)
            on_road = np.abs(t) < half_w
            # Roads may bridge water but should not follow it.
            if on_road.any() and water[on_road].mean() < 0.15:
                break
        else:
            continue
        if axis >= 0:
            # No second road right next to this one along the same direction (looks like a duplicate).
            major = [sp for sp in major if sp[0] != axis or abs(sp[1] - c) > 0.15 * size]
        road_id[on_road] = len(roads)
        # Keep this road's own pixel positions: a later crossing road may overwrite some of road_id.
        roads.append((line, half_w, s[on_road]))
    road = road_id >= 0
    label[road] = ROAD  # roads overwrite water: bridges

    # --- 4. buildings --------------------------------------------------------------------------------------
    building = np.zeros((size, size), bool)
    roof = np.zeros((size, size, 3), np.float32)
    if roads and rng.random() < 0.9:
        blocked = water | road
        for _ in range(int(rng.integers(1, 3))):
            line, road_half, road_s = roads[int(rng.integers(len(roads)))]
            s0 = float(rng.choice(road_s))
            sig_s = size * rng.uniform(0.06, 0.16)
            sig_t = size * rng.uniform(0.02, 0.07)
            n_target = int(rng.integers(3, 9) * max(scale, 0.35) ** 2) + 2
            placed = 0
            for _ in range(n_target * 4):
                if placed >= n_target:
                    break
                # Large enough to span several pixels at the generator's 64 px (barns, warehouses, blocks).
                a = max(1.2, size * rng.uniform(0.03, 0.06))  # half length
                b = max(1.2, size * rng.uniform(0.022, 0.04))  # half width
                side = 1 if rng.random() < 0.5 else -1
                t_off = side * (road_half + b + 1 + abs(rng.normal(0, sig_t)))
                bx, by = line.point(s0 + rng.normal(0, sig_s), t_off)
                psi = theta + (np.pi / 2 if rng.random() < 0.3 else 0) + rng.normal(0, 0.05)
                placed += _draw_building(rng, building, roof, blocked, bx + size / 2, by + size / 2, a, b, psi)
        label[building] = BUILDING

    # --- image ---------------------------------------------------------------------------------------------
    img = _texture(rng, size, label, pid, parcel_col, u, v, box, long_u, stripe_period, stripe_amp, stripe_phase)
    if roads:
        road_col = np.stack([_ROAD_COLOURS[rng.integers(len(_ROAD_COLOURS))] for _ in roads])
        tex = road_col[np.maximum(road_id, 0)] + rng.normal(0, 4, (size, size, 1)).astype(np.float32)
        m = label == ROAD
        img[m] = tex[m]
    img[building] = roof[building]

    # Shadows fall on the ground next to buildings, away from a per-scene sun direction.
    if building.any():
        dy, dx = (int(d) for d in rng.choice([-1, 1], 2))
        length = max(1, int(round(size * rng.uniform(0.01, 0.02))))
        shadow = np.zeros_like(building)
        for k in range(1, length + 1):
            shadow |= _shift(building, k * dy, k * dx)
        shadow &= ~building
        img[shadow] *= np.array([0.45, 0.47, 0.52], np.float32)

    # Region / season recolouring per class, then the sensor: gamma, colour cast, haze.
    multipliers, haze, gamma, cast = _appearance(seed, index)
    ground = np.where(label == IGNORE_INDEX, 0, label)  # no-data is painted later
    img *= multipliers[ground]
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** gamma * cast
    img = (1 - haze) * img + haze * _HAZE_COLOUR

    # Mild scene-level radiometric variation and sensor noise.
    img *= rng.uniform(0.88, 1.12)
    img += rng.uniform(-6, 6, 3).astype(np.float32)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)

    # --- 5. no-data swath edge -----------------------------------------------------------------------------
    if rng.random() < ignore_prob:
        border = int(rng.integers(4))
        depth = (yy, size - 1 - yy, xx, size - 1 - xx)[border]
        along = (xx if border < 2 else yy) / max(size - 1, 1)
        w0, w1 = rng.uniform(0.0, 0.3, 2) * size
        w0 = max(w0, 2.0)  # keep at least a sliver so ignore_prob=1 always yields no-data pixels
        nodata = depth < w0 + (w1 - w0) * along
        label[nodata] = IGNORE_INDEX
        img[nodata] = 0

    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label


def _draw_building(
    rng: np.random.Generator,
    building: np.ndarray,
    roof: np.ndarray,
    blocked: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    psi: float,
) -> int:
    """Rasterise one rotated rectangular roof at pixel (cx, cy) unless it collides; return 1 if drawn."""
    size = building.shape[0]
    r = int(math.ceil(math.hypot(a, b))) + 2
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, size)
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size)
    if x0 >= x1 or y0 >= y1:
        return 0
    wy, wx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = wx + 0.5 - cx, wy + 0.5 - cy
    cp, sp = math.cos(psi), math.sin(psi)
    du = dx * cp + dy * sp
    dv = -dx * sp + dy * cp
    inside = (np.abs(du) <= a) & (np.abs(dv) <= b)
    margin = (np.abs(du) <= a + 1.5) & (np.abs(dv) <= b + 1.5)  # keep a gap between neighbours
    if inside.sum() < 3 or (margin & (blocked[y0:y1, x0:x1] | building[y0:y1, x0:x1])).any():
        return 0
    colour = _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))] * rng.uniform(0.9, 1.08)
    # Gabled roof: the two halves either side of the ridge catch the sun differently.
    shade = np.where(dv > 0, 1.0, rng.uniform(0.75, 0.9)).astype(np.float32)
    win_roof = roof[y0:y1, x0:x1]
    win_roof[inside] = colour * shade[inside][:, None]
    building[y0:y1, x0:x1] |= inside
    return 1


def _texture(
    rng: np.random.Generator,
    size: int,
    label: np.ndarray,
    pid: np.ndarray,
    parcel_col: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    box: np.ndarray,
    long_u: np.ndarray,
    stripe_period: np.ndarray,
    stripe_amp: np.ndarray,
    stripe_phase: np.ndarray,
) -> np.ndarray:
    """Per-class ground textures (roads and roofs are painted by the caller)."""
    scale = size / 256.0
    img = np.zeros((size, size, 3), np.float32)
    base = parcel_col[pid]
    # Thin darker field margins (hedges, tracks) at parcel edges.
    edge = np.minimum.reduce([u - box[pid, 0], box[pid, 1] - u, v - box[pid, 2], box[pid, 3] - v])
    margin = np.where(edge < max(0.8, 1.2 * scale), 0.82, 1.0).astype(np.float32)[..., None]

    m = label == SOIL
    if m.any():
        grain = rng.normal(0, 0.05, (size, size)).astype(np.float32) + 0.04 * _smooth(rng, size, 12 * scale + 4)
        img[m] = (base * (1 + grain[..., None]) * margin)[m]

    m = label == FARM
    if m.any():
        coord = np.where(long_u[pid], v, u)  # stripes run along the long side, i.e. vary across it
        stripes = np.sin(2 * np.pi * coord / stripe_period[pid] + stripe_phase[pid]) * stripe_amp[pid]
        patch = 0.05 * _smooth(rng, size, 10 * scale + 3) + rng.normal(0, 0.02, (size, size)).astype(np.float32)
        img[m] = (base * (1 + stripes + patch)[..., None] * margin)[m]

    m = label == FOREST
    if m.any():
        # Tree crowns (fine) over stand-level variation (coarse); the dark gaps read as canopy shadow.
        canopy = (
            0.6 * _smooth(rng, size, size / 4.5) + 0.3 * _smooth(rng, size, size / 14) + 0.2 * _smooth(rng, size, 4)
        )
        col = _FOREST_COLOURS[rng.integers(len(_FOREST_COLOURS))] * rng.uniform(0.85, 1.1) * rng.uniform(0.96, 1.04, 3)
        img[m] = (col * np.clip(1 + 0.22 * canopy, 0.4, 1.8)[..., None])[m]

    m = label == WATER
    if m.any():
        col = _WATER_COLOURS[rng.integers(len(_WATER_COLOURS))] * rng.uniform(0.85, 1.1) * rng.uniform(0.96, 1.04, 3)
        img[m] = (col * (1 + 0.06 * _smooth(rng, size, 5))[..., None])[m]
    return img


def make_prompt(label: np.ndarray) -> str:
    """Prompt naming classes covering >= 0.1% of the labelled pixels, largest area first."""
    return describe_label(label, CLASSES)


def colourise(label: np.ndarray) -> np.ndarray:
    """Map a label image to RGB with PALETTE; ignore pixels are black."""
    return colourise_mask(label, PALETTE)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _name(index: int) -> str:
    return f"toy_{index:05d}.png"


def _write_pair(job: tuple[Path, int, int, int, float]) -> str:
    out, seed, index, size, ignore_prob = job
    image, label = generate_scene(seed, index, size, ignore_prob)
    _write_png(out / "img" / _name(index), image)
    _write_png(out / "label" / _name(index), label)  # 2-D uint8 -> single-channel 'L' PNG
    return make_prompt(label)


def write_dataset(
    out: Path, num: int, size: int, seed: int = 0, ignore_prob: float = 0.3, workers: int = 1, progress: bool = True
) -> Path:
    """Write ``num`` image/label pairs, classes.json and (last) index.jsonl under ``out``; return index."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "label").mkdir(parents=True, exist_ok=True)
    meta = {"classes": list(CLASSES), "palette": [list(c) for c in PALETTE], "ignore_index": IGNORE_INDEX}
    write_text_atomic(out / "classes.json", json.dumps(meta, indent=2) + "\n")
    # How the scenes were drawn, so a model trained on them can name its data exactly (e.g. a model card).
    recipe = {"num": num, "size": size, "seed": seed, "ignore_prob": ignore_prob}
    write_text_atomic(out / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")

    jobs = [(out, seed, i, size, ignore_prob) for i in range(num)]
    bar = dict(total=num, desc="toydata", unit="scene", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            prompts = list(tqdm(pool.map(_write_pair, jobs, chunksize=max(1, num // (8 * workers))), **bar))
    else:
        prompts = list(tqdm((_write_pair(j) for j in jobs), **bar))

    lines = (
        json.dumps({"source": f"label/{_name(i)}", "target": f"img/{_name(i)}", "prompt": p})
        for i, p in enumerate(prompts)
    )
    index_path = out / "index.jsonl"
    write_text_atomic(index_path, "".join(line + "\n" for line in lines))
    return index_path


def preview_grid(seed: int = 0, n: int = 4, size: int = 256, ignore_prob: float = 0.3) -> Image.Image:
    """Grid of ``n`` scenes, each shown as image | colourised label, two scenes per row."""
    gap = max(2, size // 64)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    pair_w = 2 * size + gap
    canvas = Image.new("RGB", (cols * pair_w + (cols - 1) * 3 * gap, rows * size + (rows - 1) * gap), "white")
    for i in range(n):
        image, label = generate_scene(seed, i, size, ignore_prob)
        x0 = (i % cols) * (pair_w + 3 * gap)
        y0 = (i // cols) * (size + gap)
        canvas.paste(Image.fromarray(image), (x0, y0))
        canvas.paste(Image.fromarray(colourise(label)), (x0 + size + gap, y0))
    return canvas


def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case; the hyphenated spelling of earlier versions (`--ignore-prob`) still works."""
    from crfm.utils.flags import add_run_flags, positive_int  # imports torch, which the scenes do not need

    parser = argparse.ArgumentParser(prog="python -m crfm.toy.toydata", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder")
    parser.add_argument("--num", type=int, help="number of scenes to write")
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels")
    parser.add_argument(
        "--ignore_prob", "--ignore-prob", dest="ignore_prob", type=float, default=0.3,
        help="chance of a no-data border wedge",
    )  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes")
    parser.add_argument("--preview", type=Path, help="also write a 4-scene preview grid PNG here")
    add_run_flags(parser, seed_help="seed of the scenes (scene i depends only on the seed and i)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    from crfm.utils.flags import UsageError

    if args.out is None and args.preview is None:
        raise UsageError("give OUT and/or --preview")
    if args.out is not None and (args.num is None or args.num < 1):
        raise UsageError("OUT needs --num N (N >= 1)")
    if args.size < 8:
        raise UsageError("--size must be at least 8")
    if not 0.0 <= args.ignore_prob <= 1.0:
        raise UsageError("--ignore_prob must be in [0, 1]")


def run(args: argparse.Namespace) -> int:
    """Write the preview and/or the dataset of `args`; 0 on success."""
    check_args(args)
    if args.preview is not None:
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        grid = preview_grid(args.seed, 4, args.size, args.ignore_prob)
        with atomic_path(args.preview) as tmp:
            grid.save(tmp, format="PNG")
        print(f"wrote {args.preview}")
    if args.out is not None:
        index = write_dataset(
            args.out, args.num, args.size, args.seed, args.ignore_prob, args.workers, progress=not args.no_progress
        )
        print(f"wrote {args.num} scenes, index {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from crfm.utils.flags import run_cli

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
