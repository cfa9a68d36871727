"""Regenerate `demo/`: a few real Dubai aerial pairs (CC0) plus a few toy pairs, in one class scheme.

    python scripts/make_demo.py [--shared ../shared/rs_samples]

The Dubai labels are remapped to the toy classes so that every line of demo/index.jsonl means the
same thing by the same class id; images are copied byte for byte. LoveDA pairs stay out (licence).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

from crfm.data.dataset import load_label  # noqa: E402
from crfm.data.index import IGNORE_INDEX, describe_label  # noqa: E402
from crfm.toy.toydata import CLASSES, PALETTE, generate_scene  # noqa: E402
from crfm.utils.fileio import atomic_path, write_jsonl_atomic, write_text_atomic  # noqa: E402
from crfm.utils.flags import run_cli  # noqa: E402

DUBAI_PAIRS = ("tile1_part001", "tile2_part003", "tile3_part005")
# Dubai ids (building, land, road, vegetation, water) -> toy ids.
DUBAI_TO_TOY = {0: CLASSES.index("building"), 1: CLASSES.index("bare soil"), 2: CLASSES.index("road")}
DUBAI_TO_TOY |= {3: CLASSES.index("forest"), 4: CLASSES.index("water")}
TOY_PAIRS = 4
TOY_SIZE = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/make_demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "rs_samples", help="rs_samples folder")
    parser.add_argument("--out", type=Path, default=REPO / "demo", help="the demo dataset folder to (re)write")
    return parser


def make_demo(args: argparse.Namespace) -> int:
    (args.out / "demo_img").mkdir(parents=True, exist_ok=True)
    (args.out / "demo_label").mkdir(parents=True, exist_ok=True)

    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for dubai_id, toy_id in DUBAI_TO_TOY.items():
        lut[dubai_id] = toy_id
    records = []
    for name in DUBAI_PAIRS:
        shutil.copyfile(args.shared / "dubai_aerial" / "img" / f"{name}.jpg", args.out / "demo_img" / f"{name}.jpg")
        label = lut[load_label(args.shared / "dubai_aerial" / "label" / f"{name}.png", num_cls=5)]
        with atomic_path(args.out / "demo_label" / f"{name}.png") as tmp:
            Image.fromarray(label).save(tmp)
        records.append(
            {
                "source": f"demo_label/{name}.png",
                "target": f"demo_img/{name}.jpg",
                "prompt": describe_label(label, CLASSES),
                "dataset": "dubai_aerial",
            }
        )
    for index in range(TOY_PAIRS):
        image, label = generate_scene(seed=2024, index=index, size=TOY_SIZE)
        name = f"toy_{index:05d}"
        for folder, array in (("demo_img", image), ("demo_label", label)):
            with atomic_path(args.out / folder / f"{name}.png") as tmp:
                Image.fromarray(array).save(tmp)
        records.append(
            {
                "source": f"demo_label/{name}.png",
                "target": f"demo_img/{name}.png",
                "prompt": describe_label(label, CLASSES),
                "dataset": "toy",
            }
        )
    meta = {"classes": list(CLASSES), "palette": [list(c) for c in PALETTE], "ignore_index": IGNORE_INDEX}
    write_text_atomic(args.out / "classes.json", json.dumps(meta, indent=2) + "\n")
    write_jsonl_atomic(args.out / "index.jsonl", records)
    print(f"wrote {len(records)} pairs to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), make_demo, argv)


if __name__ == "__main__":
    raise SystemExit(main())
