"""Training step time with cached latents (`train.py --latents_path`) against encoding every step, on this CPU.

    python bench/bench_cached_latents.py --part demo    # the demo's size: the shipped tiny base, 64 px, batch 8
    python bench/bench_cached_latents.py --part sd35    # SD3.5's VAE and width: an extrapolation, see below

demo: 64 toy scenes, vectorized and cached with the shipped base (`crfm/toy/tiny_sd35_base`), then train.py's own
loop (`crfm.training.train.train`, in-process) for `--steps` steps per run, uncached and cached alternately
(`--rounds` each), one thread; s/step is train.py's summary (data loading, encode, forward, backward, AdamW).

sd35: one 512 px VAE encode (batch 1, fp32, the training VAE's precision) with SD3.5's VAE config against one
training step of a 2-layer transformer at SD3.5-medium's real width (512 px, batch 1, fp32, full mode, AdamW;
bench/gpu_check.py's `Trainer`, random weights), one thread. A 24-layer step is extrapolated as 12 x the 2-layer
step (block 0 is a dual-attention block, block 1 the lighter last one, so the pair is about an average pair; the
embedders and head, counted 12 times, are < 1 % of it): an extrapolation, not a measurement. The ratio on a GPU
differs (convolutions and matmuls speed up differently); bench/gpu_check.py measures the GPU step itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from crfm.utils.runs import median_seconds  # noqa: E402

BASE = REPO / "crfm" / "toy" / "tiny_sd35_base"


def demo(args: argparse.Namespace) -> None:
    from crfm.data.vectorize import vectorize_index
    from crfm.toy.toydata import write_dataset
    from crfm.training.cache_latents import main as cache_main
    from crfm.training.train import build_parser, train

    root = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    data = root / "data"
    write_dataset(data, num=64, size=64, seed=3, progress=False)
    vectorize_index(BASE, data / "index.jsonl", data / "index_.jsonl", root / "vec", progress=False)
    common = [
        "--pretrained_model_name_or_path", str(BASE), "--data_root", str(data), "--num_cls", "6",
        "--resolution", "64", "--mask_encoding", args.mask_encoding, "--no_progress",
    ]  # fmt: skip
    start = time.perf_counter()
    assert cache_main([*common, "--work_dir", str(root / "latents"), "--flip_prob", "0.5"]) == 0
    cache_seconds = time.perf_counter() - start
    results: dict[str, list[float]] = {"uncached": [], "cached": []}
    for round_ in range(args.rounds):
        for name, extra in (("uncached", []), ("cached", ["--latents_path", str(root / "latents")])):
            argv = [
                *common, "--vectors_path", str(root / "vec"), "--work_dir", str(root / f"{name}{round_}"),
                "--train_batch_size", "8", "--max_train_steps", str(args.steps), "--checkpointing_steps", "100000",
                "--report_to", "none", "--skip_data_check", *extra,
            ]  # fmt: skip
            results[name].append(train(build_parser().parse_args(argv))["seconds_per_step"])
    uncached, cached = (statistics.median(results[k]) for k in ("uncached", "cached"))
    print(f"\n### Demo size: tiny SD3.5 base, 64 px, batch 8, --mask_encoding {args.mask_encoding}, 1 thread\n")
    print(f"caching 64 scenes (+ flipped): {cache_seconds:.1f} s")
    print("| run | s/step (median of rounds) | each round |\n|---|---:|---|")
    for name in ("uncached", "cached"):
        print(f"| {name} | {statistics.median(results[name]):.4f} | {', '.join(f'{v:.4f}' for v in results[name])} |")
    print(f"\ncached / uncached step time: {cached / uncached:.2f} (uncached is {uncached / cached:.2f}x)")


def encode_seconds(repeats: int) -> float:
    """Median seconds of one 512 px encode with SD3.5's VAE config (random weights, fp32)."""
    from diffusers import AutoencoderKL

    from crfm.models.sd35 import SD35_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD35_VAE).requires_grad_(False).eval()
    image = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        return median_seconds(lambda: vae.encode(image).latent_dist.parameters, repeats=repeats)


def sd35(args: argparse.Namespace) -> None:
    from gpu_check import Sizes, Trainer, build_mask_model, cached_batch, train_args

    from crfm.models.sd35 import SD35_MEDIUM_TRANSFORMER

    encode = encode_seconds(args.repeats)
    sizes = Sizes.full()
    sizes.transformer = {**SD35_MEDIUM_TRANSFORMER, "num_layers": 2, "dual_attention_layers": (0,)}
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as work:
        train = train_args("full", "adamw", "no", Path(work))
        trainer = Trainer(build_mask_model(sizes, cpu, train, torch.float32, training=True), sizes, train)
    batch = cached_batch(sizes, 512, 1, cpu)
    step2 = median_seconds(lambda: trainer.step(batch), repeats=args.repeats)
    step24 = 12 * step2
    print("\n### SD3.5 size (CPU, fp32, 1 thread, random weights; the 24-layer step is extrapolated)\n")
    print("| what | seconds |\n|---|---:|")
    print(f"| VAE encode, SD3.5's VAE, 512 px, batch 1 | {encode:.2f} |")
    print(f"| training step, 2 layers at real width, 512 px, batch 1, full mode | {step2:.2f} |")
    print(f"| training step, 24 layers (12 x the 2-layer step: extrapolated) | {step24:.1f} |")
    for encoding, encodes in (("onehot", 1), ("grey / palette", 2)):
        uncached = step24 + encodes * encode
        print(
            f"\n--mask_encoding {encoding} ({encodes} encode(s) per item and step): cached / uncached step time "
            f"{step24 / uncached:.3f}; the encode is {100 * encodes * encode / uncached:.1f} % of an uncached step"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("demo", "sd35", "both"), default="both")
    parser.add_argument("--mask_encoding", default="onehot", help="demo part (the demo's default: onehot)")
    parser.add_argument("--steps", type=int, default=40, help="demo part: training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="demo part: runs of each kind, alternating")
    parser.add_argument("--repeats", type=int, default=2, help="sd35 part: timed repeats (after one warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("demo", "both"):
        demo(args)
    if args.part in ("sd35", "both"):
        sd35(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
