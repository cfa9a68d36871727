"""The demo generator's fine-tuning step on this CPU, eager against `torch.compile`, in train.py's own loop.

    OMP_NUM_THREADS=1 python bench/demo_step.py outputs/demo [--steps 80] [--compile]

Runs `crfm.training.train` with the demo's own generator flags (`Demo.generator_flags`, from the folder's recorded
knobs) on a finished demo folder's base, labelled scenes and vectors, into a temporary work dir, `--steps` steps,
and times every step (the first ones include `torch.compile`'s compiling). Prints the first steps and the
median of the last half: what a compiled model must save per step to pay for its compile time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="a finished demo folder (tiny_sd35, toydata, vectors)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    args = parser.parse_args()

    import json

    import torch

    import crfm.training.train as train_module
    from crfm.toy.demo.settings import SETTINGS_FILE, DemoSettings, recorded_knobs
    from crfm.toy.demo.stages import Demo

    build_model = train_module.build_model

    def build_compiled(*a, **k):
        model, vae, schedule, counts = build_model(*a, **k)
        return torch.compile(model), vae, schedule, counts

    seconds: list[float] = []
    train_step = train_module.train_step

    def timed_step(*a, **k):
        start = time.perf_counter()
        loss = train_step(*a, **k)
        seconds.append(time.perf_counter() - start)
        return loss

    if args.compile:
        train_module.build_model = build_compiled
    train_module.train_step = timed_step
    settings = DemoSettings(**recorded_knobs(json.loads((args.demo / SETTINGS_FILE).read_text())))
    demo_flags = Demo(args.demo.resolve(), settings, progress=False).generator_flags()
    with tempfile.TemporaryDirectory() as work:
        # The later of two equal flags wins: a temporary work dir, `--steps` steps, no checkpoint but the last.
        flags = [*demo_flags, "--work_dir", work, "--max_train_steps", args.steps, "--checkpointing_steps", args.steps]
        train_module.train(train_module.build_parser().parse_args([str(f) for f in flags]))
    tail = statistics.median(seconds[len(seconds) // 2 :])
    mode = "compiled" if args.compile else "eager"
    print(f"{mode}: first steps {[round(s, 2) for s in seconds[:3]]} s; median of the last half {tail:.4f} s/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
