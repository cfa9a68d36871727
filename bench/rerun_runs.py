"""Later stages of finished demo runs again, with other sampling or filter knobs or the current code: the same
generator, guide, judge and real-data rows, paired against the run's own rows.

    python bench/rerun_runs.py --runs outputs/bench_demo/default/seed0 outputs/bench_demo/default/seed1 \
        outputs/bench_demo/default/seed2 --variant views8="--filter_views 8"                  # the filter alone
    python bench/rerun_runs.py --runs ... --from synthesis --variant now=""                 # syntheses too
    python bench/rerun_runs.py --runs ... --from models --variant v6="--base outputs/base_v6/tiny_sd35_base"
    python bench/rerun_runs.py --runs ... --from models --variant lr2e-3="--learning_rate 0.002"  # the fine-tuning

`--from filter` (the default): the run's syntheses filtered again and the filtered downstream rows trained again,
so a difference is the filter's alone (the new layouts' syntheses are the run's too: the demo's filter stage filters
them and makes the union again). `--from synthesis`: every synthesis, the fidelity table, the filter and the
downstream rows made again by the current code (e.g. test.py's CRFM defaults), from the run's models. `--from
models`: the base copied again (a variant's `--base`), the generator fine-tuned again on it and everything after it
made again, beside the run's own data, judge and real-data segmentors (which no base changes). Each
(variant, run) is a copy of the run without what is redone, its settings with the variant's knobs (only those of
`KNOBS`), then `python -m crfm.toy.demo`, which reuses every finished stage. Resumable: finished copies are reused.
The table: the rows that changed (mIoU, road and building IoU), mean ± std over runs, and the paired difference to
the run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from functools import partial
from pathlib import Path

from crfm.toy.demo.rows import (
    DOWNSTREAM,
    GENERATOR_DATA,
    GENERATOR_VECTORS,
    LAYOUT_VECTORS,
    LAYOUTS,
    MOSAICS_AND_SYNTH,
    REAL_MOSAICS,
)
from crfm.utils.runs import REPO, Job, mean_std, print_table, run_jobs_or_exit, run_logged

KNOBS = ("tolerance_margin", "filter_views", "num_inference_steps", "mask_guidance_scale", "num_per_mask", "base",
         "learning_rate", "lr_schedule", "ema_decay", "translate", "train_steps", "uniform_timestep_share")  # fmt: skip
SAMPLING_KNOBS = ("num_inference_steps", "mask_guidance_scale", "num_per_mask")  # from synthesis or earlier
MODEL_KNOBS = (
    "base",
    "learning_rate",
    "lr_schedule",
    "ema_decay",
    "translate",
    "train_steps",
    "uniform_timestep_share",
)  # the generator's: only with --from models
# The rows trained on synthetic pairs, and the mosaics + layouts union's.
SYNTHETIC_ROWS = [row for row in DOWNSTREAM if row.synthetic and row.synthetic != REAL_MOSAICS]
FILTERED_ROWS = [row for row in SYNTHETIC_ROWS if row.synthetic.endswith("_filtered")]
UNION_ROW = next(row for row in DOWNSTREAM if row.synthetic == MOSAICS_AND_SYNTH[0])
REPORT = {"summary.json", "summary.md", "samples.png"}
# --from filter: what a copy leaves behind (the filtered sets, their union, the rows trained on them).
REDONE = {
    *(row.work for row in FILTERED_ROWS), *(row.synthetic for row in FILTERED_ROWS), MOSAICS_AND_SYNTH[0],
    UNION_ROW.work, *REPORT,
}  # fmt: skip
# What a copy keeps, by where it starts. From the models: the data and the segmentors that no base changes; from
# synthesis, also the base, the prompt vectors and the generator (the models stage's products).
KEPT_FROM_MODELS = {
    "demo_settings.json", "stages", "logs", "toydata", "toydata_judge", REAL_MOSAICS, LAYOUTS, "seg_judge",
    *(row.work for row in DOWNSTREAM if row.synthetic in (None, REAL_MOSAICS)),
}  # fmt: skip
KEPT = {
    "models": KEPT_FROM_MODELS,
    "synthesis": KEPT_FROM_MODELS
    | {"tiny_sd35", "vectors", LAYOUT_VECTORS, GENERATOR_VECTORS, GENERATOR_DATA[0], "train"},
}
# The stages a copy keeps as done, by where it starts.
KEPT_STAGES = {"synthesis": ("data", "pipeline", "vectors", "models"), "models": ("data",)}
REDONE_STAGES = ("filter", "layouts", "downstream")  # "layouts": a stage of folders made before the filter took it


def knob_values(knobs: str, start: str) -> dict[str, object]:
    from crfm.toy.demo import build_parser

    args = build_parser().parse_args(shlex.split(knobs))
    refused = {"filter": SAMPLING_KNOBS + MODEL_KNOBS, "synthesis": MODEL_KNOBS, "models": ()}[start]
    allowed = tuple(k for k in KNOBS if k not in refused)
    values = {name: getattr(args, name) for name in allowed if getattr(args, name) is not None}
    others = [word for word in shlex.split(knobs) if word.startswith("--") and word[2:] not in allowed]
    if others:
        raise SystemExit(f"{knobs!r}: from {start}, only the knobs {allowed} can change, not {others}")
    return values


def left_behind(run: Path, start: str, where: str, names: list[str]) -> list[str]:
    """copytree's ignore, in the run's own folder only (train/summary.json is the generator's): from the filter,
    `REDONE` and bench scripts' caches (`bench_*`); from synthesis or the models, all but what `KEPT` keeps."""
    if Path(where) != run:
        return []
    if start in KEPT:
        return [name for name in names if name not in KEPT[start]]
    return [name for name in names if name in REDONE or name.startswith("bench_")]


def rerun(run: Path, folder: Path, knobs: str, start: str) -> None:
    """Copy `run` to `folder` without what is redone from `start`, with the variant's knobs; run the demo on it."""
    from crfm.toy.demo.settings import recorded_knobs

    if not (folder / "demo_settings.json").is_file():
        partial_copy = folder.with_name(folder.name + ".copying")
        shutil.rmtree(partial_copy, ignore_errors=True)
        shutil.copytree(
            run, partial_copy, symlinks=True, ignore=lambda where, names: left_behind(run, start, where, names)
        )
        for marker in (partial_copy / "stages").iterdir():
            if marker.stem in REDONE_STAGES or (start in KEPT_STAGES and marker.stem not in KEPT_STAGES[start]):
                marker.unlink()
        settings = json.loads((run / "demo_settings.json").read_text()) | knob_values(knobs, start)
        (partial_copy / "demo_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        partial_copy.rename(folder)
    # Every knob, as the demo reads a folder's.
    settings_values = recorded_knobs(json.loads((folder / "demo_settings.json").read_text()))
    run_logged([
        sys.executable, "-m", "crfm.toy.demo", "--out", str(folder), "--no_progress", *demo_flags(settings_values)
    ], folder.with_suffix(".log"), threads=None)  # fmt: skip


def demo_flags(recorded: dict[str, object]) -> list[str]:
    """The demo's command-line knobs that reproduce complete recorded settings."""
    import dataclasses

    from crfm.toy.demo.settings import DemoSettings

    flags = []
    for field in dataclasses.fields(DemoSettings):
        value = recorded[field.name]
        if isinstance(field.default, bool):
            flags.append(f"--{field.name}" if value else f"--no-{field.name}")
        else:
            flags += [f"--{field.name}", str(value)]
    return flags


def rows_of(folder: Path) -> dict[str, float]:
    summary = json.loads((folder / "summary.json").read_text())
    down = summary["downstream"]
    values = {f"judge {images}": row["judge_mIoU"] for images, row in summary["mask_fidelity"].items()}
    for row in SYNTHETIC_ROWS:
        if row.key in down:
            values[row.key] = down[row.key]["mIoU"]
            values |= {f"{row.key} IoU.{c}": down[row.key][f"IoU.{c}"] for c in ("road", "building")}
    if "real_synth_filtered" in values and "real_synth_plain_filtered" in values:
        values["CRFM − plain, filtered"] = values["real_synth_filtered"] - values["real_synth_plain_filtered"]
    if "real_mosaic" in down and "real_mosaic_synth_layouts" in values:
        values["mosaics + layouts − mosaics"] = values["real_mosaic_synth_layouts"] - down["real_mosaic"]["mIoU"]
    if "real_mosaic" in down and "real_synth_layouts" in values:
        values["layouts − mosaics"] = values["real_synth_layouts"] - down["real_mosaic"]["mIoU"]
    return values


def table(results: dict[str, list[dict[str, float]]]) -> str:
    names = list(results)
    # A variant without the run's ablation rows (e.g. a default run of a full one) is compared on the rows both have.
    keys = [key for key in results["run"][0] if all(key in row for rows in results.values() for row in rows)]
    lines = ["| quantity | " + " | ".join(f"{n} ({len(results[n])} runs)" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(mean_std(r[key] for r in results[n]) for n in names) + " |")
    lines += ["", "Paired difference to the run (same models, same seed):", ""]
    lines += ["| quantity | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * len(names[1:])]
    for key in keys:
        cells = [mean_std(r[key] - b[key] for r, b in zip(results[n], results["run"], strict=True)) for n in names[1:]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished demo runs")
    parser.add_argument("--variant", action="append", required=True, help='NAME="--knob value ..." (KNOBS)')
    parser.add_argument("--from", dest="start", choices=("filter", "synthesis", "models"), default="filter")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "rerun")
    parser.add_argument("--jobs", type=int, default=1, help="(variant, run) pairs at once")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    for knobs in variants.values():
        knob_values(knobs, args.start)  # refused before anything is copied
    runs = [run.resolve() for run in args.runs]
    out = args.out.resolve()
    jobs = [
        Job(f"{name}/{run.name}", [], partial(rerun, run, out / name / run.name, knobs, args.start))
        for name, knobs in variants.items() for run in runs
    ]  # fmt: skip
    run_jobs_or_exit(jobs, args.jobs)
    results = {"run": [rows_of(run) for run in runs]}
    results |= {name: [rows_of(out / name / run.name) for run in runs] for name in variants}
    print_table(table(results), args.table, "python bench/rerun_runs.py " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
