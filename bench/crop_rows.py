"""Where the toy world's crop rows are lost: the scene's resolution, the generator's, the VAE, the samples.

    python bench/crop_rows.py outputs/heldout_steps/steps1800/seed0 [more demo runs] [--out table.md]

The toy world draws farmland with crop rows: a sinusoid across each parcel (`crfm.toy.toydata._texture`). Each
held-out scene of a finished demo run is drawn twice from its own seed, as written and with every row's amplitude
set to zero (the RNG stream is the same, so the two differ by the rows alone). Their difference is the rows' signal,
measured on the farmland pixels (the mask eroded by one pixel, so parcel edges do not count):

- `energy at 64 px`: the rows' mean squared luminance at the generator's resolution over that at the scene's
  (the images are resized as every stage resizes them, `image_to_tensor`);
- `VAE keeps`: the share of the 64-px rows the run's VAE reproduces in phase (the projection of the VAE's
  difference on the rows), and `VAE energy` its energy over the rows'; `VAE keeps at full size`: the same for the
  scenes at their own size (what a generator at the scenes' resolution would start from with this VAE);
- the samples cannot be paired with a phase, so for them the farmland's high-frequency energy (the mean squared
  Laplacian of the luminance, as in `crfm.fewstep.evaluate.detail`) is given as a share of the real 64-px images'
  (`detail vae / plain / crfm`); `rows' share of detail` is how much of that real energy the rows make (the rest is
  grain and patches).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import numpy as np


def scene_pair(seed: int, index: int, size: int):
    """(image with rows, the same image without rows, label) of toy scene `index`, uint8 arrays."""
    from unittest import mock

    from crfm.toy import toydata

    texture = toydata._texture
    signature = inspect.signature(texture)

    def without_rows(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        # Drawn as before, then zeroed: the RNG stream, and so everything else in the scene, is unchanged.
        bound.arguments["stripe_amp"] = np.zeros_like(bound.arguments["stripe_amp"])
        return texture(*bound.args, **bound.kwargs)

    image, label = toydata.generate_scene(seed, index, size)
    with mock.patch.object(toydata, "_texture", without_rows):
        plain, plain_label = toydata.generate_scene(seed, index, size)
    assert (plain_label == label).all()
    return image, plain, label


def luminance(image) -> np.ndarray:
    """HxW mean of the channels, in the [-1, 1] units of every stage; `image` a 3xHxW tensor."""
    return image.float().mean(0).numpy()


def laplacian_energy(grey, where) -> tuple[float, int]:
    """Sum of the squared Laplacian of `grey` over `where`, and the pixel count (edges padded by replication)."""
    padded = np.pad(grey, 1, mode="edge")
    lap = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * grey
    return float((lap[where] ** 2).sum()), int(where.sum())


def measure(run: Path, index: str) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from scipy import ndimage

    from crfm.data.dataset import image_to_tensor
    from crfm.data.index import read_index
    from crfm.models.conditioning import vae_round_trip
    from crfm.toy.toydata import FARM

    recorded = json.loads((run / "demo_settings.json").read_text())
    side = recorded["resolution"]
    vae = AutoencoderKL.from_pretrained(run / "tiny_sd35" / "vae").eval()
    samples = {}
    for name in ("plain", "crfm"):
        folder = run / f"synth_{name}"
        for line in (folder / "index.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if entry["variant"] == 0:  # the first sample of each held-out mask, as the fidelity stage scores
                samples[name, Path(entry["source_mask"]).name] = folder / entry["target"]

    sums = {key: 0.0 for key in ("full", "full_vae_dot", "low", "vae_dot", "vae_energy")}
    lap = {key: [0.0, 0] for key in ("rows", "no rows", "vae", "plain", "crfm")}
    root = run / "toydata"
    for item in read_index(root / index, root):
        scene = int(Path(item.target).stem.split("_")[-1])
        image, plain, label = scene_pair(recorded["seed"], scene, recorded["scene_size"])
        written = np.asarray(Image.open(root / item.target).convert("RGB"))
        assert (written == image).all(), f"{item.target} is not scene {scene} of seed {recorded['seed']}"
        farm_full = ndimage.binary_erosion(label == FARM)
        if farm_full.any():
            full = torch.stack([image_to_tensor(Image.fromarray(x)) for x in (image, plain)])
            rows_full = luminance(full[0]) - luminance(full[1])
            sums["full"] += float((rows_full[farm_full] ** 2).mean())
            decoded = vae_round_trip(vae, full)
            sums["full_vae_dot"] += float(
                ((luminance(decoded[0]) - luminance(decoded[1])) * rows_full)[farm_full].mean()
            )

        low, low_plain = (image_to_tensor(Image.fromarray(x), side) for x in (image, plain))
        low_label = np.asarray(Image.fromarray(label).resize((side, side), Image.Resampling.NEAREST))
        farm = ndimage.binary_erosion(low_label == FARM)
        if not farm.any():
            continue
        rows = (luminance(low) - luminance(low_plain))[farm]
        decoded = vae_round_trip(vae, torch.stack([low, low_plain]))
        vae_rows = (luminance(decoded[0]) - luminance(decoded[1]))[farm]
        sums["low"] += float((rows**2).mean())
        sums["vae_dot"] += float((vae_rows * rows).mean())
        sums["vae_energy"] += float((vae_rows**2).mean())

        images = {"rows": low, "no rows": low_plain, "vae": decoded[0]}
        for name in ("plain", "crfm"):
            images[name] = image_to_tensor(Image.open(samples[name, Path(item.source).name]).convert("RGB"), side)
        for name, tensor in images.items():
            total, count = laplacian_energy(luminance(tensor), farm)
            lap[name][0] += total
            lap[name][1] += count

    detail = {name: total / count for name, (total, count) in lap.items()}
    return {
        "energy at 64 px": sums["low"] / sums["full"],
        "VAE keeps": sums["vae_dot"] / sums["low"],
        "VAE keeps at full size": sums["full_vae_dot"] / sums["full"],
        "VAE energy": sums["vae_energy"] / sums["low"],
        "rows' share of detail": 1 - detail["no rows"] / detail["rows"],
        **{f"detail {name}": detail[name] / detail["rows"] for name in ("vae", "plain", "crfm")},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished demo runs (demo_settings.json, synth_plain/crfm)")
    parser.add_argument("--json_file", default="test.jsonl", help="the scenes, under each run's toydata/")
    parser.add_argument("--out", type=Path, help="also write the table here")
    return parser


def main(argv: list[str] | None = None) -> int:
    from crfm.utils.runs import mean_std

    args = build_parser().parse_args(argv)
    rows = {str(run): measure(run, args.json_file) for run in args.runs}
    keys = list(next(iter(rows.values())))
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {run} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for run, v in rows.items()]
    if len(rows) > 1:
        spread = {k: [v[k] for v in rows.values()] for k in keys}
        lines.append("| mean ± std | " + " | ".join(mean_std(x, digits=3) for x in spread.values()) + " |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
