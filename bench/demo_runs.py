"""The demo over several seeds and variants: mean ± std of every row that decides a claim.

    python bench/demo_runs.py --seeds 0 1 2                                   # the default demo, 3 seeds
    python bench/demo_runs.py --seeds 0 1 2 --variant grey="--mask_encoding grey" \
        --variant scratch="--base scratch" --until fidelity                 # ablations: where fidelity is lost

Each (variant, seed) is one `python -m crfm.demo --seed S --out OUT/VARIANT/seedS KNOBS` run; finished runs are
reused, so the job is resumable (run it under nohup, re-run after an interruption). A seed changes everything the
demo draws: scenes, splits, fine-tuning, segmentors and sampling noise; the shipped base stays the same. The table
(markdown, also printed) gives mean ± std over seeds of judge mIoU per image set, the paired differences
CRFM − plain and real + synthetic − real only, and the demo's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_SETS = ("real", "vae", "plain", "crfm_paper", "crfm")


def run_demo(out: Path, seed: int, knobs: list[str], until: str | None) -> None:
    cmd = [sys.executable, "-m", "crfm.demo", "--out", str(out), "--seed", str(seed), "--no_progress", *knobs]
    if until:
        cmd += ["--until", until]
    print("$", shlex.join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def read_run(out: Path) -> dict[str, float]:
    """The numbers one run produced (whatever stages it reached)."""
    values: dict[str, float] = {}
    for images in IMAGE_SETS:
        path = out / "fidelity" / f"{images}_seg_judge.json"
        if path.is_file():
            values[images] = 100 * json.loads(path.read_text())["mIoU"]
    for key, work in (("real_only", "seg_real"), ("real_synth", "seg_real_synth")):
        path = out / work / "metrics.json"
        if path.is_file() and (key == "real_synth" or (out / "stages" / "downstream.json").is_file()):
            values[key] = json.loads(path.read_text())["mIoU"]
    if "plain" in values and "crfm" in values:
        values["crfm_gain"] = values["crfm"] - values["plain"]
    if "real_only" in values and "real_synth" in values:
        values["synth_gain"] = values["real_synth"] - values["real_only"]
    values["seconds"] = sum(json.loads(p.read_text())["seconds"] for p in (out / "stages").glob("*.json"))
    return values


COLUMNS = {
    "real": "real",
    "vae": "VAE ceiling",
    "plain": "plain",
    "crfm_paper": "CRFM paper",
    "crfm": "CRFM default",
    "crfm_gain": "CRFM − plain",
    "real_only": "downstream real only",
    "real_synth": "real + synth",
    "synth_gain": "synth gain",
    "seconds": "demo s",
}


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "| variant | seeds | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for variant, runs in results.items():
        cells = [mean_std([r[key] for r in runs if key in r]) for key in COLUMNS]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=[], help='NAME="--knob value ..." (default: plain demo)')
    parser.add_argument("--until", help="stop each demo after this stage (e.g. fidelity)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_demo")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else {"default": ""}
    results: dict[str, list[dict[str, float]]] = {}
    for name, knobs in variants.items():
        results[name] = []
        for seed in args.seeds:
            out = args.out / name / f"seed{seed}"
            run_demo(out, seed, shlex.split(knobs), args.until)
            results[name].append(read_run(out))
            print(json.dumps({"variant": name, "seed": seed, **results[name][-1]}), flush=True)
    text = table(results)
    command = "python bench/demo_runs.py " + shlex.join(sys.argv[1:])
    print(text)
    if args.table:
        args.table.write_text(f"`{command}`\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
