"""The demo generator's fine-tuning step on this CPU, eager against `torch.compile`, in train.py's own loop.

    OMP_NUM_THREADS=1 python bench/demo_step.py outputs/demo [--steps 80] [--compile]

Runs `crfm.training.train` with the demo's generator flags (onehot masks added to the image tokens, mask dropout,
quarter turns, batch 8, 64 px) on a finished demo folder's base, labelled scenes and vectors, into a temporary work
dir, and times every step (the first ones include `torch.compile`'s compiling). Prints the first steps and the
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

    import torch

    import crfm.training.train as train_module

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
    demo = args.demo
    with tempfile.TemporaryDirectory() as work:
        flags = [
            "--pretrained_model_name_or_path", demo / "tiny_sd35", "--data_root", demo / "toydata",
            "--json_file", "train_.jsonl", "--vectors_path", demo / "vectors", "--work_dir", work,
            "--mask_encoding", "onehot", "--mask_dropout", 0.1, "--mask_add", "--rot90", "--num_cls", 6,
            "--resolution", 64, "--train_batch_size", 8, "--max_train_steps", args.steps, "--learning_rate", 1e-3,
            "--lr_warmup_steps", max(1, args.steps // 10), "--checkpointing_steps", args.steps + 1, "--seed", 0,
            "--mixed_precision", "no", "--no_progress",
        ]  # fmt: skip
        train_module.train(train_module.build_parser().parse_args([str(f) for f in flags]))
    tail = statistics.median(seconds[len(seconds) // 2 :])
    mode = "compiled" if args.compile else "eager"
    print(f"{mode}: first steps {[round(s, 2) for s in seconds[:3]]} s; median of the last half {tail:.4f} s/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
