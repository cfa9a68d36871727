"""Does CRFM make synthesized images follow their masks better? Plain vs CRFM from the same seeds and masks.

    python bench/crfm_vs_plain.py --pipe P --ckpt C --data_root D --json_file val_.jsonl --vectors V \
        --guide SEG_DIR --judge SEG_DIR --out OUT [--resolution 64 --num_per_mask 2 --steps 23]

SEG_DIR holds `config.py` + `segmentor.pth` from scripts/train_segmentor.py. The guide segmentor drives CRFM;
mask fidelity (mIoU of a segmentor on the synthesized images against their masks) is reported for both the
guide and an independently trained judge, since the guide alone would grade its own homework. Also writes the
per-step CRFM loss trace and a grid (mask | plain | CRFM | real).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--pipe", "--ckpt", "--data_root", "--vectors", "--guide", "--judge", "--out"):
        parser.add_argument(name, required=True, type=Path)
    parser.add_argument("--json_file", default="val_.jsonl")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_per_mask", type=int, default=2)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--rectified_step", type=int, default=4)
    parser.add_argument("--max_step_size", type=float, default=0.1)
    parser.add_argument("--num_cls", type=int, default=6)
    args = parser.parse_args()

    import numpy as np

    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.sampling.synthesis import main as synthesize
    from crfm.segmentation.adapter import load_segmentor
    from crfm.segmentation.evaluate import mask_fidelity
    from crfm.utils.viz import image_grid

    common = [
        "--pretrained_model_name_or_path", str(args.pipe), "--data_root", str(args.data_root),
        "--json_file", args.json_file, "--lora_ckpt", str(args.ckpt), "--vectors_path", str(args.vectors),
        "--num_cls", str(args.num_cls), "--resolution", str(args.resolution), "--batch_size", "8",
        "--num_per_mask", str(args.num_per_mask), "--num_inference_steps", str(args.steps), "--no_progress",
    ]  # fmt: skip
    crfm = [
        "--mmseg_config", str(args.guide / "config.py"), "--mmseg_ckpt", str(args.guide / "segmentor.pth"),
        "--rectified_step", str(args.rectified_step), "--max_step_size", str(args.max_step_size),
    ]  # fmt: skip
    seconds = {}
    for name, extra in (("plain", []), ("crfm", crfm)):
        start = time.perf_counter()
        synthesize([*common, "--work_dir", str(args.out / name), *extra])
        seconds[name] = time.perf_counter() - start

    results = {"seconds": seconds}
    segmentors = {k: load_segmentor(d / "config.py", d / "segmentor.pth", num_cls=args.num_cls) for k, d in
                  (("guide", args.guide), ("judge", args.judge))}  # fmt: skip
    real = PairDataset(read_index(args.data_root / args.json_file), args.data_root, resolution=args.resolution)
    for seg_name, segmentor in segmentors.items():
        results[f"{seg_name}_on_real"] = mask_fidelity(segmentor, real, args.num_cls, progress=False)
        for name in ("plain", "crfm"):
            synthetic = PairDataset(read_index(args.out / name / "index.jsonl"), args.out / name)
            results[f"{seg_name}_on_{name}"] = mask_fidelity(segmentor, synthetic, args.num_cls, progress=False)
    trace = [json.loads(x) for x in (args.out / "crfm" / "crfm_trace.rank0.jsonl").read_text().splitlines()]
    per_step = {}
    for record in trace:
        per_step.setdefault(record["step"], []).extend(record["loss"])
    results["crfm_loss_per_step"] = {step: float(np.mean(v)) for step, v in sorted(per_step.items())}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    lines = ["| images | guide mIoU (%) | judge mIoU (%) | guide aAcc (%) | judge aAcc (%) |", "|---|---|---|---|---|"]
    for name in ("real", "plain", "crfm"):
        g, j = results[f"guide_on_{name}"], results[f"judge_on_{name}"]
        values = (100 * g["mIoU"], 100 * j["mIoU"], 100 * g["aAcc"], 100 * j["aAcc"])
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    table = "\n".join(lines)
    steps = ", ".join(f"step {s}: {v:.3f}" for s, v in results["crfm_loss_per_step"].items())
    report = f"{table}\n\nCRFM loss (misclassified-pixel CE, mean over images) before each rectification: {steps}\n"
    report += f"wall time: plain {seconds['plain']:.0f} s, CRFM {seconds['crfm']:.0f} s\n"
    (args.out / "results.md").write_text(report)
    print(report)

    from PIL import Image

    from crfm.toy.toydata import colourise

    plain_items = read_index(args.out / "plain" / "index.jsonl")[: 6 * args.num_per_mask : args.num_per_mask]
    rows = []
    for item in plain_items:
        mask = np.asarray(Image.open(args.out / "plain" / item.source))
        rows.append(
            [
                colourise(mask),
                Image.open(args.out / "plain" / item.target),
                Image.open(args.out / "crfm" / item.target),
                real[int(item.record["unit"][:5])]["image"].add(1).mul(127.5).byte().permute(1, 2, 0).numpy(),
            ]
        )
    image_grid(rows, titles=["mask", "plain", "CRFM", "real"], cell=128).save(args.out / "grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
