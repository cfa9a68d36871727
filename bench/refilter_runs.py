"""Filter knobs on finished demo runs: the same synthetic pairs filtered again, the filtered downstream rows trained
again, paired against the run's own rows.

    python bench/refilter_runs.py --runs outputs/bench_demo/default/seed0 outputs/bench_demo/default/seed1 \
        outputs/bench_demo/default/seed2 --variant views8="--filter_views 8" --jobs 2

For each (variant, run) the run is copied (without its filtered sets and the rows trained on them), its settings get
the variant's knobs (only the filter's: `FILTER_KNOBS`), and the demo's own code filters the ×`num_per_mask` sets and
the new layouts again, rebuilds the mosaics + layouts union and trains the downstream rows that need synthetic pairs
(`python -m crfm.toy.demo`, which reuses every finished stage). The syntheses, the generator, the guide, the judge
and the real-data rows are the run's, so a difference is the filter's alone. Resumable: finished copies are reused.
The table: downstream mIoU of the filtered rows, mean ± std over runs, and the paired difference to the run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from functools import partial
from pathlib import Path

from crfm.toy.demo.rows import DOWNSTREAM, MOSAICS_AND_SYNTH
from crfm.utils.runs import REPO, Job, mean_std, print_table, run_jobs_or_exit, run_logged

FILTER_KNOBS = ("tolerance_margin", "filter_views")
# What a copy leaves behind: the filtered sets, their union, the rows trained on them, the stages that made them.
FILTERED_ROWS = [row for row in DOWNSTREAM if row.synthetic and row.synthetic.endswith("_filtered")]
REDONE = {
    *(row.work for row in FILTERED_ROWS), *(row.synthetic for row in FILTERED_ROWS), MOSAICS_AND_SYNTH[0],
    next(row.work for row in DOWNSTREAM if row.synthetic == MOSAICS_AND_SYNTH[0]), "summary.json", "summary.md",
    "samples.png",
}  # fmt: skip
REDONE_STAGES = ("filter", "layouts", "downstream")


def knob_values(knobs: str) -> dict[str, object]:
    from crfm.toy.demo import build_parser

    args = build_parser().parse_args(shlex.split(knobs))
    values = {name: getattr(args, name) for name in FILTER_KNOBS if getattr(args, name) is not None}
    others = [word for word in shlex.split(knobs) if word.startswith("--") and word[2:] not in FILTER_KNOBS]
    if others:
        raise SystemExit(f"{knobs!r}: only the filter's knobs {FILTER_KNOBS} can change here, not {others}")
    return values


def top_level(run: Path, where: str, names: list[str]) -> list[str]:
    """copytree's ignore: `REDONE` names and bench scripts' caches (`bench_*`) in the run's own folder only
    (train/summary.json is the generator's)."""
    return [name for name in names if name in REDONE or name.startswith("bench_")] if Path(where) == run else []


def refilter(run: Path, folder: Path, knobs: str) -> None:
    """Copy `run` to `folder` without what the filter made, with the variant's knobs; filter and train again."""
    from crfm.toy.demo.stages import Demo

    if not (folder / "demo_settings.json").is_file():
        partial_copy = folder.with_name(folder.name + ".copying")
        shutil.rmtree(partial_copy, ignore_errors=True)
        shutil.copytree(run, partial_copy, symlinks=True, ignore=lambda where, names: top_level(run, where, names))
        for stage in REDONE_STAGES:
            (partial_copy / "stages" / f"{stage}.json").unlink(missing_ok=True)
        settings = json.loads((run / "demo_settings.json").read_text()) | knob_values(knobs)
        (partial_copy / "demo_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        partial_copy.rename(folder)
    settings_values = json.loads((folder / "demo_settings.json").read_text())
    if not (folder / "stages" / "layouts.json").is_file():
        from crfm.toy.demo.settings import DemoSettings

        # The layouts stage's syntheses are the run's: only its filter and the union are redone, in the demo's code.
        demo = Demo(folder, DemoSettings(**settings_values), progress=False)
        demo.filter()
        demo.filter_synthetic("synth_layouts")
        demo.union_dataset(*MOSAICS_AND_SYNTH)
        for stage in ("filter", "layouts"):
            (folder / "stages" / f"{stage}.json").write_text(json.dumps({"seconds": 0.0}) + "\n")
    run_logged([
        sys.executable, "-m", "crfm.toy.demo", "--out", str(folder), "--no_progress", *demo_flags(settings_values)
    ], folder.with_suffix(".log"), threads=None)  # fmt: skip


def demo_flags(recorded: dict[str, object]) -> list[str]:
    """The demo's command-line knobs that reproduce recorded settings (a knob recorded by none: `KNOBS_BEFORE`)."""
    import dataclasses

    from crfm.toy.demo.settings import KNOBS_BEFORE, DemoSettings

    flags = []
    for field in dataclasses.fields(DemoSettings):
        value = recorded.get(field.name, KNOBS_BEFORE.get(field.name, field.default))
        if isinstance(field.default, bool):
            flags.append(f"--{field.name}" if value else f"--no-{field.name}")
        else:
            flags += [f"--{field.name}", str(value)]
    return flags


def rows_of(folder: Path) -> dict[str, float]:
    down = json.loads((folder / "summary.json").read_text())["downstream"]
    values = {}
    for row in [*FILTERED_ROWS, *(r for r in DOWNSTREAM if r.synthetic == MOSAICS_AND_SYNTH[0])]:
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
    keys = list(results["run"][0])
    lines = ["| quantity | " + " | ".join(f"{n} ({len(results[n])} runs)" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(mean_std(r[key] for r in results[n]) for n in names) + " |")
    lines += ["", "Paired difference to the run (same syntheses, same seed):", ""]
    lines += ["| quantity | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * len(names[1:])]
    for key in keys:
        cells = [mean_std(r[key] - b[key] for r, b in zip(results[n], results["run"], strict=True)) for n in names[1:]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished demo runs")
    parser.add_argument("--variant", action="append", required=True, help='NAME="--filter_knob value ..."')
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "refilter")
    parser.add_argument("--jobs", type=int, default=1, help="(variant, run) pairs at once")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    for knobs in variants.values():
        knob_values(knobs)  # refused before anything is copied
    runs = [run.resolve() for run in args.runs]
    out = args.out.resolve()
    jobs = [
        Job(f"{name}/{run.name}", [], partial(refilter, run, out / name / run.name, knobs))
        for name, knobs in variants.items() for run in runs
    ]  # fmt: skip
    run_jobs_or_exit(jobs, args.jobs)
    results = {"run": [rows_of(run) for run in runs]}
    results |= {name: [rows_of(out / name / run.name) for run in runs] for name in variants}
    print_table(table(results), args.table, "python bench/refilter_runs.py " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
