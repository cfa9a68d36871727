"""The demo over several seeds and variants: mean ± std of every row that decides a claim.

    python bench/demo_runs.py --seeds 0 1 2                  # the default demo and its ablation rows, 3 seeds
    python bench/demo_runs.py --seeds 0 1 2 --variant grey="--mask_encoding grey" \
        --variant scratch="--base scratch" --until fidelity                 # ablations: where fidelity is lost

Each (variant, seed) is one `python -m crfm.toy.demo --preset full --seed S --out OUT/VARIANT/seedS KNOBS` run (the
default demo with the ablation rows; a `--preset` among the knobs replaces it); finished runs are
reused, so the job is resumable (run it under nohup, re-run after an interruption). A seed changes everything the
demo draws: scenes, splits, fine-tuning, segmentors and sampling noise; the shipped base stays the same. The table
(markdown, also printed) gives mean ± std over seeds of judge mIoU per image set and of every downstream row, the
paired differences that decide issue #17's targets (filtered synthetic − real only, filtered − unfiltered, CRFM −
plain synthetic downstream, TSTR / TRTR), a per-seed table, the demo's seconds, and each downstream row's IoU per class
(mean ± std over seeds). `--jobs 2` runs two demos at
once, each on one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from functools import partial
from pathlib import Path

from crfm.toy.toydata import CLASSES
from crfm.utils.runs import Job, mean_std, print_table, run_jobs_or_exit, run_logged

REPO = Path(__file__).resolve().parents[1]
IMAGE_SETS = ("real", "vae", "plain", "crfm_paper", "crfm", "fewstep")
DOWNSTREAM = ("real_only", "real_synth_plain", "real_synth", "real_synth_plain_filtered", "real_synth_filtered",
              "real_synth_filtered_resampled", "real_synth_layouts", "real_mosaic", "real_mosaic_synth_layouts",
              "real_extra", "tstr")  # fmt: skip
# Paired differences over seeds: name -> (minuend, subtrahend); "ratio" columns divide instead.
DIFFERENCES = {
    "CRFM − plain (judge)": ("crfm", "plain"),
    "filtered − real only": ("real_synth_filtered", "real_only"),
    "filtered+resampled − real only": ("real_synth_filtered_resampled", "real_only"),
    "unfiltered − real only": ("real_synth", "real_only"),
    "filtered − unfiltered": ("real_synth_filtered", "real_synth"),
    "CRFM − plain synthetic, filtered (downstream)": ("real_synth_filtered", "real_synth_plain_filtered"),
    "CRFM − plain synthetic, unfiltered (downstream)": ("real_synth", "real_synth_plain"),
    "new layouts − real only": ("real_synth_layouts", "real_only"),
    "new layouts − filtered (same masks)": ("real_synth_layouts", "real_synth_filtered"),
    "real mosaics − real only": ("real_mosaic", "real_only"),
    "new layouts − real mosaics": ("real_synth_layouts", "real_mosaic"),
    "mosaics + new layouts − real mosaics": ("real_mosaic_synth_layouts", "real_mosaic"),
    "extra real − real only": ("real_extra", "real_only"),
}
# Image sets whose judge IoU per class is also given as a share of the real images' (the targets are such shares).
SHARES_OF_REAL = ("vae", "plain", "crfm")
RATIOS = {"VAE / real (judge)": ("vae", "real"), "plain / real (judge)": ("plain", "real"),
          "TSTR / TRTR": ("tstr", "real_only")}  # fmt: skip


def run_demo(out: Path, seed: int, knobs: list[str], until: str | None) -> None:
    preset = [] if "--preset" in knobs else ["--preset", "full"]  # the default demo and its ablation rows
    cmd = [sys.executable, "-m", "crfm.toy.demo", "--out", str(out), "--seed", str(seed), "--no_progress", *preset]
    cmd += knobs
    if until:
        cmd += ["--until", until]
    run_logged(cmd, out.with_suffix(".log"), threads=int(os.environ.get("OMP_NUM_THREADS", "1")))


def read_run(out: Path) -> dict[str, float]:
    """The numbers one run produced (whatever stages it reached)."""
    values: dict[str, float] = {}
    for images in IMAGE_SETS:
        path = out / "fidelity" / f"{images}_seg_judge.json"
        if path.is_file():
            judged = json.loads(path.read_text())
            values[images] = 100 * judged["mIoU"]
            # "<image set> IoU.<class>": the judge's IoU per class (the targets name roads and buildings)
            values.update({f"{images} IoU.{c}": 100 * iou for c, iou in zip(CLASSES, judged["IoU"], strict=True)})
    summary = out / "summary.json"
    if summary.is_file():
        down = json.loads(summary.read_text())["downstream"]
        values.update({key: down[key]["mIoU"] for key in DOWNSTREAM if key in down})
        # "<row> IoU.<class>": per class, where the run's segmentors reported it (PerClassIoUMetric)
        values.update({f"{key} {k}": v for key in DOWNSTREAM if key in down for k, v in down[key].items()
                       if k.startswith("IoU.")})  # fmt: skip
    for name, (a, b) in DIFFERENCES.items():
        if a in values and b in values:
            values[name] = values[a] - values[b]
    for name, (a, b) in RATIOS.items():
        if a in values and b in values:
            values[name] = values[a] / values[b]
    for images in SHARES_OF_REAL:
        values.update({f"{images} / real IoU.{c}": values[f"{images} IoU.{c}"] / values[f"real IoU.{c}"]
                       for c in CLASSES if f"{images} IoU.{c}" in values and values.get(f"real IoU.{c}")})  # fmt: skip
    values["seconds"] = sum(json.loads(p.read_text())["seconds"] for p in (out / "stages").glob("*.json"))
    return values


COLUMNS = (*IMAGE_SETS, *DOWNSTREAM, *DIFFERENCES, *RATIOS, "seconds")


def table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    """One row per quantity (mean ± std over seeds per variant), then every seed's value."""
    names = list(results)
    lines = [
        "| quantity | " + " | ".join(f"{n} ({len(results[n])} seeds)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key in COLUMNS:
        cells = [mean_std([r[key] for r in results[n] if key in r]) for n in names]
        if any(c != "–" for c in cells):
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for name in names:
        lines += ["", f"Per seed ({name}):", "", "| quantity | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
        lines.append("|---|" + "---|" * len(seeds))
        for key in COLUMNS:
            cells = [f"{r[key]:.2f}" if key in r else "–" for r in results[name]]
            if any(c != "–" for c in cells):
                lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + per_class(results)


def per_class(results: dict[str, list[dict[str, float]]]) -> str:
    """Per variant: IoU (%) per class under the judge (image sets, and their share of the real images' IoU) and of
    each downstream row, mean ± std over seeds (NaN: class unseen, left out)."""
    text = ""
    for name, runs in results.items():
        classes = list(dict.fromkeys(k.split(" IoU.", 1)[1] for r in runs for k in r if " IoU." in k))
        if not classes:
            continue
        text += f"\nIoU per class, judge on image sets, then downstream rows ({name}):\n\n| row | "
        text += " | ".join(classes) + " |\n" + "|---|" + "---|" * len(classes) + "\n"
        shares = [f"{images} / real" for images in SHARES_OF_REAL]
        for key in (*IMAGE_SETS, *shares, *DOWNSTREAM):
            if not any(f"{key} IoU.{c}" in r for r in runs for c in classes):
                continue
            seen = [[r[f"{key} IoU.{c}"] for r in runs if not math.isnan(r.get(f"{key} IoU.{c}", math.nan))]
                    for c in classes]  # fmt: skip
            text += f"| {key} | " + " | ".join(mean_std(values) for values in seen) + " |\n"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=[], help='NAME="--knob value ..." (default: plain demo)')
    parser.add_argument("--until", help="stop each demo after this stage (e.g. fidelity)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_demo")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--jobs", type=int, default=1, help="demos run at once (each on one thread)")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else {"default": ""}
    runs = [(name, seed) for name in variants for seed in args.seeds]

    measured: dict[tuple[str, int], dict[str, float]] = {}

    def one(name: str, seed: int) -> None:
        out = args.out / name / f"seed{seed}"
        run_demo(out, seed, shlex.split(variants[name]), args.until)
        measured[name, seed] = read_run(out)
        print(json.dumps({"variant": name, "seed": seed, **measured[name, seed]}), flush=True)

    run_jobs_or_exit([Job(f"{name}/seed{seed}", [], partial(one, name, seed)) for name, seed in runs], args.jobs)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for name, seed in runs:
        results[name].append(measured[name, seed])
    print_table(table(results, args.seeds), args.table, "python bench/demo_runs.py " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
