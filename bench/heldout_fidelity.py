"""Held-out mask fidelity of a generator fine-tuned by bench/generator_variants.py, in the demo's own stages.

    python bench/heldout_fidelity.py --run outputs/bench_v6/default/seed0 \
        --train outputs/gv_sched/lr2e-3/seed0/train --knobs "--learning_rate 0.002" --out outputs/heldout_lr2/seed0

A copy of a finished demo run (`--until models` suffices) that links the run's data, base, prompt vectors, guide and
judge and the variant's fine-tuning folder as its generator, with the variant's knobs in its settings; then the demo's
`synthesis` and `fidelity` stages (`--until fidelity`), so the held-out judge scores are made exactly as the demo makes
them; `--until downstream` adds the downstream rows (`--no_ablations`: the default demo's only), `--until report`
the demo's summary.json and figure as well. With
`--knobs "--base FOLDER"` the copy's base is that folder (its text encoders must be the run's, whose prompt vectors are
linked): e.g. the run's base with its VAE decoder refitted, whose fine-tuning is the run's own. Resumable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from crfm.utils.runs import run_logged


def _bench_module(name: str):
    """bench/NAME.py (bench scripts are not a package): rerun_runs' knob checks and demo flags, generator_variants'
    text-encoder check."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What a copy takes from the run: what `rerun_runs.py --from synthesis` keeps, but the generator is the variant's and
# the settings, stage markers and logs are the copy's own.
OWN = ("demo_settings.json", "stages", "logs", "train")


def main() -> int:
    from crfm.toy.demo.settings import DemoSettings, pretrained_base, recorded_knobs

    rerun_runs = _bench_module("rerun_runs")
    linked = sorted(rerun_runs.KEPT["synthesis"] - set(OWN))

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run (at least its models stage)")
    parser.add_argument("--train", type=Path, required=True, help="the variant's fine-tuning (holds final/)")
    parser.add_argument("--knobs", default="", help="the variant's knobs, recorded in the copy's settings")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--until", default="fidelity", help="the demo stage to stop after (downstream: its rows too; report: every "
        "stage and the demo's summary.json and figure)",
    )  # fmt: skip
    parser.add_argument("--no_ablations", action="store_true", help="only the default demo's rows (not the run's)")
    args = parser.parse_args()
    run, out = args.run.resolve(), args.out.resolve()
    # The knobs first: one that is not the generator's is refused before anything is written.
    recorded = json.loads((run / "demo_settings.json").read_text())
    settings = recorded | rerun_runs.knob_values(args.knobs, "models")
    if args.no_ablations:
        settings["ablations"] = False
    links = {name: run / name for name in linked} | {"train": args.train.resolve()}
    if settings["base"] != recorded["base"]:
        # A base named by the knobs (e.g. the run's with its decoder refitted) is the copy's: it decodes the samples.
        links["tiny_sd35"] = pretrained_base(DemoSettings(base=settings["base"])).resolve()
        _bench_module("generator_variants").check_same_text_encoders(links["tiny_sd35"], run / "tiny_sd35")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for name, target in links.items():
        if target.exists() and not (out / name).exists():  # the generator's own data: only with --generator_mosaics
            (out / name).symlink_to(target)
    for stage in rerun_runs.KEPT_STAGES["synthesis"]:
        shutil.copy(run / "stages" / f"{stage}.json", out / "stages")
    (out / "demo_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    flags = rerun_runs.demo_flags(recorded_knobs(settings))
    cmd = [sys.executable, "-m", "crfm.toy.demo", "--out", str(out), "--no_progress", *flags]
    cmd += [] if args.until == "report" else ["--until", args.until]  # the demo's report follows its last stage
    run_logged(cmd, out.with_suffix(".log"), threads=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
