"""Training-step time and peak memory of the mask-conditioned MM-DiT, full vs LoRA, checkpointing on/off.

    python bench/bench_train.py                       # tiny SD3.5 config on this CPU
    python bench/bench_train.py --sd35-medium --device cuda --dtype bf16 --resolution 512   # on a GPU
    (bash bench/gpu_check.sh measures more on a GPU: train.py's step, FLOPs, MFU, sampling)

`--sd35-medium` builds a randomly initialised transformer with SD3.5-medium's config (24 layers, width 1536,
dual attention in layers 0-12, qk RMS-norm, 2.2 B parameters + mask branch); no weights are downloaded.
One step = forward with image + mask + text tokens, loss, backward, AdamW step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from crfm.models.mmdit import MaskSD3Transformer2DModel  # noqa: E402
from crfm.models.sd35 import SD35_MEDIUM_TRANSFORMER as SD35_MEDIUM  # noqa: E402
from crfm.models.trained_weights import configure_training  # noqa: E402
from crfm.utils.flags import DTYPES  # noqa: E402


def build_base(args) -> SD3Transformer2DModel:
    if args.sd35_medium:
        with torch.device(args.device):
            return SD3Transformer2DModel(**SD35_MEDIUM)
    from crfm.toy.tiny import TinyConfig, save_tiny_pipeline

    pipe_dir = save_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny", TinyConfig())
    return SD3Transformer2DModel.from_pretrained(pipe_dir / "transformer").to(args.device)


def measure(args, mode: str, checkpointing: bool) -> tuple[float, float]:
    dtype = DTYPES[args.dtype]
    model = MaskSD3Transformer2DModel.from_sd3(build_base(args), mask_init="copy").to(args.device, dtype)
    configure_training(model, mode, args.lora_rank)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = model.transformer.config
    side = args.resolution // 8
    shape = (args.batch_size, cfg.in_channels, side, side)
    latents, mask = (
        torch.randn(shape, device=args.device, dtype=dtype),
        torch.randn(shape, device=args.device, dtype=dtype),
    )
    text = torch.randn(args.batch_size, 77 + 256, cfg.joint_attention_dim, device=args.device, dtype=dtype)
    pooled = torch.randn(args.batch_size, cfg.pooled_projection_dim, device=args.device, dtype=dtype)
    timestep = torch.full((args.batch_size,), 500.0, device=args.device)

    def step() -> None:
        pred = model(latents, text, pooled, timestep, mask_hidden_states=mask, return_dict=False)[0]
        torch.nn.functional.mse_loss(pred.float(), latents.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return statistics.median(times), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd35-medium", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    name = "SD3.5-medium-sized" if args.sd35_medium else "tiny SD3.5"
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"{name}, {args.resolution} px, batch {args.batch_size}, {args.dtype}, {where}\n")
    print("| mode | gradient checkpointing | s/step | peak GPU memory (GiB) |\n|---|---|---|---|")
    for mode in ("full", "lora"):
        for checkpointing in (False, True):
            try:
                seconds, peak = measure(args, mode, checkpointing)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                print(f"| {mode} | {'on' if checkpointing else 'off'} | {seconds:.3f} | {peak:.1f} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {mode} | {'on' if checkpointing else 'off'} | out of memory | - |", flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
