"""One GPU check of crfm at SD3.5-medium size: training step time, memory, FLOP rate and MFU; sampling speed.

    bash bench/gpu_check.sh                           # a CUDA machine: writes bench/results_gpu.md (277 s, H200)
    bash bench/gpu_check.sh --smoke --out /tmp/g.md   # the same code on the CPU, small sizes (< 2 min)

Everything is built with random weights from SD3.5-medium's configs (`crfm/models/sd35.py`): the transformer (all
24 layers) with crfm's mask branch (onehot masks, 7 classes as LoveDA), SD3.5's VAE, and a SegFormer (B2-like,
built with mmseg's API from a config) as CRFM's guide at 512 px. Values do not change time or memory, so no
weights are needed. Measured, each time-boxed (a few warm-up and timed repeats; what does not fit the budget is
marked skipped):

- training (train.py's own code: the model from `crfm.training.build` (`mask_model`, `configure_model`: trained
  weights fp32, frozen ones bf16, gradient checkpointing), its accelerator (bf16), optimizer and LR schedule, and
  `crfm.training.train.train_step` on cached-latent batches through the flow-matching objective, gradient
  clipping included) in LoRA and full mode at 512 px batch 1,
  4 and 16 and at 1024 px batch 1 and 4: s/step, peak memory (`torch.cuda.max_memory_allocated`), the step's FLOPs
  (counted analytically from the model's layers; checked against `torch.utils.flop_counter` on one forward),
  achieved TFLOP/s and MFU against the card's dense bf16 peak (by device name, or `--peak_tflops`), and the GPU's
  busy share (kernel time from `torch.profiler` over wall time: low means the host sets the pace);
- sampling through `MaskToImagePipeline` at 512 px batch 4: 23 Euler steps plain, 23 steps with CRFM on the
  first 4 (`CRFMConfig.paper()`), and 2 Euler steps (a few-step student's cost): images/s, peak memory;
- PyTorch SDPA vs xformers (when installed) on one training step and on plain sampling.

`--smoke` runs the same code on the CPU in fp32 on one thread: 2 layers of width 128, 128 px (256 px for the 1024 px
case), a small VAE and the toy SegFormer (`crfm/segmentation/configs/toy_segformer.py`), and writes to `--out`
(about 15 s).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from crfm.models.sd35 import SD35_MEDIUM_TRANSFORMER, SD35_SCHEDULER, SD35_VAE  # noqa: E402
from crfm.utils.flags import UsageError, entry_point, one_line  # noqa: E402

NUM_CLS = 7  # LoveDA's classes
TEXT_TOKENS = 77 + 256  # CLIP + T5, SD3's prompt encoding
DEFAULT_OUT = REPO / "bench" / "results_gpu.md"
TOY_SEGFORMER = REPO / "crfm" / "segmentation" / "configs" / "toy_segformer.py"
# Dense bf16 peak (TFLOP/s, no sparsity) by device-name fragment, most specific first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


@dataclass
class Sizes:
    """What one run builds and measures: SD3.5-medium on a GPU, or the smoke sizes on a CPU."""

    transformer: dict
    vae: dict
    segformer: dict  # overrides of the toy SegFormer config's model
    segformer_px: int
    train_cases: tuple[tuple[int, int], ...]  # (px, batch)
    sample_px: int
    sample_batch: int
    warmup: int
    repeats: int

    @classmethod
    def full(cls) -> Sizes:
        segformer = {  # MiT-B2 widths and depths, SegFormer's B2 head
            "backbone": {"embed_dims": 64, "num_layers": [3, 4, 6, 3], "num_heads": [1, 2, 5, 8]},
            "decode_head": {"in_channels": [64, 128, 320, 512], "channels": 768},
        }
        return cls(
            dict(SD35_MEDIUM_TRANSFORMER),
            dict(SD35_VAE),
            segformer,
            512,
            ((512, 1), (512, 4), (512, 16), (1024, 1), (1024, 4)),
            512,
            4,
            2,
            3,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        transformer = {**SD35_MEDIUM_TRANSFORMER, "num_layers": 2, "dual_attention_layers": (0,)}
        transformer.update(num_attention_heads=2, attention_head_dim=64, caption_projection_dim=128)
        vae = {**SD35_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
        return cls(transformer, vae, {}, 128, ((128, 1), (128, 4), (256, 1)), 128, 4, 1, 1)


@dataclass
class Row:
    cells: list[str]


@dataclass
class Report:
    device: str
    notes: list[str] = field(default_factory=list)
    train: list[Row] = field(default_factory=list)
    sampling: list[Row] = field(default_factory=list)
    attention: list[Row] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# FLOPs


PER_SAMPLE = re.compile(r"norm1(_context)?\.linear|norm_out\.linear|time_text_embed")
TEXT = re.compile(r"context_embedder|\.add_[qkv]_proj|\.to_add_out|\.ff_context\.")
MASK = re.compile(r"^mask_(blocks|embed)\.")


def stream_of(name: str) -> str:
    """Which tokens a layer of the mask model runs on: once per sample (modulation, embedders of the timestep and
    the pooled text), text, mask or image tokens."""
    if PER_SAMPLE.search(name):
        return "sample"
    if MASK.search(name):
        return "mask"
    return "text" if TEXT.search(name) else "image"


def step_flops(model: nn.Module, px: int, batch: int) -> dict[str, float]:
    """FLOPs of one training step's forward and of the whole step (model FLOPs: checkpointing's recomputation
    not counted, as MFU is defined), counted from the model's Linear/Conv layers and its joint attention.

    Backward = input gradients of every layer (as the forward) + weight gradients of the trained ones; attention
    backward = 2x its forward. Per-sample layers (AdaLN modulation) run on one token."""
    config = model.transformer.config
    n_img = (px // 8 // config.patch_size) ** 2
    tokens = {"sample": 1, "image": n_img, "mask": n_img, "text": TEXT_TOKENS}
    linear = trained = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):  # patch embeddings: per output position
            macs = module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            continue
        count = macs * tokens[stream_of(name)]
        linear += count
        trained += count if module.weight.requires_grad else 0
    width = model.transformer.inner_dim
    joint = 2 * n_img + TEXT_TOKENS
    attention = 0.0
    for block in model.transformer.transformer_blocks:
        attention += 2 * joint**2 * width  # q k^T and p v
        attention += 2 * n_img**2 * width if block.use_dual_attention else 0
    forward = 2 * (linear + attention)
    step = 2 * (2 * linear + trained + 3 * attention)
    return {"forward": batch * forward, "forward_linear": batch * 2 * linear, "step": batch * step}


def counted_forward_flops(model: nn.Module, batch: dict, dtype: torch.dtype) -> float:
    """`torch.utils.flop_counter`'s count of one forward (its CPU build does not count flash attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, autocast(batch["prompt_embeds"].device, dtype):
        model(
            batch["noise"], batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["timestep"],
            mask_hidden_states=batch["mask_condition"],
        )  # fmt: skip
    return float(counter.get_total_flops())


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in device_name), None)


# ---------------------------------------------------------------------------------------------------------
# Models and inputs


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_args(mode: str, optimizer: str, mixed_precision: str, work: Path) -> argparse.Namespace:
    """train.py's flags for this check: its defaults (learning rate, AdamW settings, flip probability, ...) with
    `mode`, onehot masks of LoveDA's classes, gradient checkpointing and the compute precision."""
    from crfm.training.train import build_parser

    return build_parser().parse_args(
        [
            "--pretrained_model_name_or_path", "-", "--data_root", "-", "--vectors_path", "-",
            "--num_cls", str(NUM_CLS), "--mask_encoding", "onehot", "--train_mode", mode, "--gradient_checkpointing",
            "--optimizer", optimizer, "--mixed_precision", mixed_precision, "--report_to", "none",
            "--work_dir", str(work),
        ]
    )  # fmt: skip


def build_mask_model(sizes: Sizes, device: torch.device, args: argparse.Namespace, weight_dtype, training: bool):
    """The mask model as train.py builds it (`crfm.training.build`: `mask_model`, then `configure_model` for
    training) on a randomly initialised SD3.5-sized transformer; for sampling every weight in `weight_dtype`, eval."""
    from diffusers import SD3Transformer2DModel

    from crfm.training.build import configure_model, mask_model

    torch.manual_seed(0)
    with torch.device(device):
        model = mask_model(args, SD3Transformer2DModel(**sizes.transformer))
    if not training:
        return model.to(weight_dtype).requires_grad_(False).eval()
    configure_model(model, args, weight_dtype)
    return model.train()


def cached_batch(sizes: Sizes, px: int, batch: int, device: torch.device) -> dict:
    """A batch as `LatentPairDataset` gives it (posterior parameters, onehot mask fractions, flipped pairs), plus
    what a sampling-style forward needs."""
    from crfm.data.latents import FLIPPED, LATENT_KEY, MASK_KEY

    gen = torch.Generator().manual_seed(px + batch)
    side, channels = px // 8, sizes.transformer["in_channels"]
    parameters = torch.cat(
        [torch.randn(batch, channels, side, side, generator=gen), torch.full((batch, channels, side, side), -2.0)], 1
    )
    fractions = torch.rand(batch, NUM_CLS, side, side, generator=gen)
    fractions = fractions / fractions.sum(1, keepdim=True)
    out = {
        LATENT_KEY: parameters,
        LATENT_KEY + FLIPPED: parameters.flip(-1),
        MASK_KEY: fractions,
        MASK_KEY + FLIPPED: fractions.flip(-1),
        "prompt_embeds": torch.randn(batch, TEXT_TOKENS, sizes.transformer["joint_attention_dim"], generator=gen),
        "pooled_prompt_embeds": torch.randn(batch, sizes.transformer["pooled_projection_dim"], generator=gen),
        "noise": torch.randn(batch, channels, side, side, generator=gen),
        "timestep": torch.full((batch,), 500.0),
        "mask_condition": fractions,
    }
    return {key: value.to(device) for key, value in out.items()}


def random_masks(batch: int, px: int, seed: int = 0) -> torch.Tensor:
    """Blocky class maps (16 px cells), as label masks look at the latent scale."""
    cells = torch.randint(0, NUM_CLS, (batch, px // 16, px // 16), generator=torch.Generator().manual_seed(seed))
    return cells.repeat_interleave(16, 1).repeat_interleave(16, 2)


def build_segmentor(sizes: Sizes, device: torch.device, work: Path):
    """An mmseg SegFormer built with mmseg's API (`crfm.segmentation.adapter.load_segmentor`, random init) from the
    toy config with `sizes.segformer`'s model overrides, for 7 classes at `sizes.segformer_px`."""
    from mmengine.config import Config

    from crfm.segmentation.adapter import load_segmentor

    config = Config.fromfile(str(TOY_SEGFORMER))
    config.model.decode_head.num_classes = NUM_CLS
    config.model.data_preprocessor.size = (sizes.segformer_px, sizes.segformer_px)
    for part, overrides in sizes.segformer.items():
        config.model[part].update(overrides)
    path = work / "segformer.py"
    config.dump(str(path))
    return load_segmentor(path, None, device=device, num_cls=NUM_CLS)


# ---------------------------------------------------------------------------------------------------------
# Measurements


class Clock:
    """The run's time budget: a measurement starts only while enough of it is left."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds of `fn` after `warmup` calls, peak GiB allocated over all of them; nan on the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(seconds), peak


def gpu_busy(fn: Callable[[], object], device: torch.device, seconds: float) -> float:
    """Kernel time of one more call of `fn` (the profiler's device events) over its timed `seconds`; nan on the CPU.
    Well under 1 means the host (Python, kernel launches) sets the pace, so a larger batch costs little more time."""
    if device.type != "cuda":
        return float("nan")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernel_us = sum(event.self_device_time_total for event in prof.events() if event.device_type != DeviceType.CPU)
    return kernel_us / 1e6 / seconds if kernel_us > 0 else float("nan")  # no device events recorded: unknown


def cell(value: float, spec: str) -> str:
    """`value` formatted by `spec`, or "-" for nan (the CPU: no allocator statistics, no device events)."""
    return "-" if value != value else spec.format(value)


class Trainer:
    """train.py's step (`crfm.training.train.train_step`) with train.py's accelerator, optimizer, LR schedule and
    flow-matching objective, on cached-latent batches (every draw from `step_generator`, as in training)."""

    def __init__(self, model: nn.Module, sizes: Sizes, args: argparse.Namespace) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        from crfm.training.build import build_accelerator, build_optimizer
        from crfm.training.objective import FlowMatchingObjective, TrainTimesteps
        from crfm.utils.flags import DTYPES

        self.accelerator = build_accelerator(args, Path(args.work_dir))
        self.dtype = DTYPES.get(self.accelerator.mixed_precision, torch.float32)
        self.trainable, optimizer, lr_scheduler = build_optimizer(args, model, 1)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, optimizer, lr_scheduler)
        with torch.device("meta"):  # only the VAE's config is read: the latents come cached
            vae = AutoencoderKL(**sizes.vae)
        schedule = TrainTimesteps.from_scheduler(FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER))
        device = self.accelerator.device
        empty = {  # the empty prompt's vectors (values change no time)
            "prompt_embeds": torch.zeros(TEXT_TOKENS, sizes.transformer["joint_attention_dim"], device=device),
            "pooled_prompt_embeds": torch.zeros(sizes.transformer["pooled_projection_dim"], device=device),
        }
        empty = {key: value.to(self.dtype) for key, value in empty.items()}
        self.loss_of = FlowMatchingObjective(args).loss(self.model, vae, schedule, empty, self.dtype)
        self.max_grad_norm = args.max_grad_norm
        self.steps = 0

    def step(self, batch: dict) -> None:
        from crfm.training.objective import step_generator
        from crfm.training.train import train_step

        self.steps += 1
        train_step(
            self.accelerator, self.model, self.loss_of, batch, step_generator(0, 0, self.steps), self.trainable,
            self.optimizer, self.lr_scheduler, self.max_grad_norm,
        )  # fmt: skip


def xformers_available(device: torch.device) -> bool:
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("xformers") is not None


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_training(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, args, report: Report, clock: Clock, work: Path
) -> None:
    peak = peak_tflops(report.device, args.peak_tflops)
    for mode in ("lora", "full"):
        if clock.left() < 60:
            report.train.append(Row([mode, "-", "-", "skipped (time budget)"]))
            continue
        train = train_args(mode, args.optimizer, "bf16" if dtype == torch.bfloat16 else "no", work)
        model = build_mask_model(sizes, device, train, dtype, training=True)
        trainer = Trainer(model, sizes, train)
        for px, batch_size in sizes.train_cases:
            if clock.left() < 30:
                report.train.append(Row([mode, str(px), str(batch_size), "skipped (time budget)"]))
                continue
            batch = cached_batch(sizes, px, batch_size, device)
            flops = step_flops(model, px, batch_size)
            if not report.notes:  # once: one forward through torch's FLOP counter against the analytic count
                counted = counted_forward_flops(model, batch, dtype)
                reference = flops["forward"] if device.type == "cuda" else flops["forward_linear"]
                report.notes.append(
                    f"FLOP count check ({mode}, {px} px, batch {batch_size}, one forward): analytic "
                    f"{reference / 1e12:.4f} TFLOP, torch.utils.flop_counter {counted / 1e12:.4f} TFLOP, "
                    f"ratio {counted / reference:.3f}"
                    + (
                        " (the CPU build counts no flash attention: linear layers only)"
                        if device.type != "cuda"
                        else ""
                    )
                )
            step = partial(trainer.step, batch)
            try:
                seconds, peak_gib = timed(step, device, sizes.warmup, sizes.repeats)
            except torch.OutOfMemoryError:
                trainer.optimizer.zero_grad(set_to_none=True)
                free_memory(device)
                report.train.append(Row([mode, str(px), str(batch_size), "out of memory"]))
                continue
            achieved = flops["step"] / seconds / 1e12
            mfu = "-" if peak is None else f"{100 * achieved / peak:.1f} %"
            busy = gpu_busy(step, device, seconds)
            cells = [
                f"{seconds:.3f}",
                cell(peak_gib, "{:.1f}"),
                f"{flops['step'] / 1e12:.3g}",
                f"{achieved:.3g}",
                mfu,
                cell(100 * busy, "{:.0f} %"),
            ]
            report.train.append(Row([mode, str(px), str(batch_size), *cells]))
            print(f"[gpu_check] train {mode}, {px} px, batch {batch_size}: {seconds:.3f} s/step", flush=True)
            if mode == "lora" and (px, batch_size) == sizes.train_cases[0] and xformers_available(device):
                model.enable_xformers()
                xformers_seconds, _ = timed(step, device, 1, sizes.repeats)
                model.enable_xformers(False)
                report.attention.append(
                    Row(
                        [
                            f"train step, LoRA, {px} px, batch {batch_size} (s)",
                            f"{seconds:.3f}",
                            f"{xformers_seconds:.3f}",
                        ]
                    )
                )
        model = trainer = None  # before the next mode's model is built
        free_memory(device)


def measure_sampling(sizes: Sizes, device: torch.device, dtype: torch.dtype, report: Report, clock: Clock, work: Path):
    """`MaskToImagePipeline` with the project's sampler and CRFM: plain 23 steps, CRFM (paper) 23 steps, 2 steps."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from crfm.sampling.pipeline import MaskToImagePipeline
    from crfm.sampling.rectify import CRFMConfig

    if clock.left() < 45:
        report.sampling.append(Row(["all", "-", "skipped (time budget)"]))
        return
    model = build_mask_model(sizes, device, train_args("full", "adamw", "no", work), dtype, training=False)
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(**sizes.vae).requires_grad_(False).eval()  # fp32, as the pipeline keeps it
    scheduler = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER)
    try:
        segmentor = build_segmentor(sizes, device, work)
    except ImportError as exc:  # mmseg/mmcv missing: plain and few-step sampling are still measured
        segmentor = None
        report.notes.append(f"CRFM not measured: the SegFormer could not be built ({one_line(exc)})")
    pipe = MaskToImagePipeline(model, vae, scheduler, NUM_CLS, segmentor=segmentor, mask_encoding="onehot")
    batch, px = sizes.sample_batch, sizes.sample_px
    gen = torch.Generator().manual_seed(2)
    labels = random_masks(batch, px)
    embeds = torch.randn(batch, TEXT_TOKENS, sizes.transformer["joint_attention_dim"], generator=gen)
    pooled = torch.randn(batch, sizes.transformer["pooled_projection_dim"], generator=gen)

    def sample(steps: int, crfm: CRFMConfig | None) -> None:
        pipe(labels, embeds, pooled, noise_ids=list(range(batch)), seed=0, num_inference_steps=steps, crfm=crfm)

    sample(2, None if segmentor is None else CRFMConfig.paper(rectified_step=1))  # warm-up (CRFM's backward too)
    cases = [
        ("plain, 23 Euler steps", 23, None),
        ("CRFM (paper: first 4 of 23 steps rectified)", 23, CRFMConfig.paper()),
        ("2-step student (2 Euler steps, no segmentor)", 2, None),
    ]
    for name, steps, crfm in cases:
        if clock.left() < 20 or (crfm is not None and segmentor is None):
            reason = "skipped (time budget)" if clock.left() < 20 else "skipped (no segmentor)"
            report.sampling.append(Row([name, str(steps), reason]))
            continue
        call = partial(sample, steps, crfm)
        seconds, peak_gib = timed(call, device, 0, 1)
        busy = gpu_busy(call, device, seconds)
        cells = [f"{seconds:.2f}", f"{batch / seconds:.2f}", cell(peak_gib, "{:.1f}"), cell(100 * busy, "{:.0f} %")]
        report.sampling.append(Row([name, str(steps), *cells]))
        print(f"[gpu_check] sampling {name}: {batch / seconds:.2f} images/s", flush=True)
        if crfm is None and steps == 23 and xformers_available(device):
            model.enable_xformers()
            xformers_seconds, _ = timed(lambda: sample(23, None), device, 0, 1)
            model.enable_xformers(False)
            report.attention.append(
                Row(
                    [
                        f"plain sampling, 23 steps, {px} px, batch {batch} (s)",
                        f"{seconds:.2f}",
                        f"{xformers_seconds:.2f}",
                    ]
                )
            )


# ---------------------------------------------------------------------------------------------------------
# Report


def table(header: list[str], rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = row.cells + ["-"] * (len(header) - len(row.cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(report: Report, sizes: Sizes, args, dtype: torch.dtype, seconds: float) -> str:
    import diffusers

    config = sizes.transformer
    width, narrowed = config["num_attention_heads"] * config["attention_head_dim"], ", narrowed" if args.smoke else ""
    peak = peak_tflops(report.device, args.peak_tflops)
    lines = [
        "# GPU check" + (" (smoke run on the CPU: small sizes, not SD3.5's)" if args.smoke else ""),
        "",
        f"`bash bench/gpu_check.sh{' --smoke' if args.smoke else ''}` ({Path(__file__).name}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s wall.",
        "",
        f"- device: **{report.device}**; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers "
        f"{diffusers.__version__}, Python {platform.python_version()}",
        f"- dense bf16 peak for MFU: {f'{peak:g} TFLOP/s' if peak is not None else 'unknown (pass --peak_tflops)'}",
        f"- transformer: {config['num_layers']} layers, width {width} (SD3.5-medium's config{narrowed}), random "
        f"weights, mask branch (onehot, {NUM_CLS} classes); compute {str(dtype).removeprefix('torch.')}; "
        f"optimizer {args.optimizer}",
        f"- VAE: block widths {list(sizes.vae['block_out_channels'])}, {sizes.vae['latent_channels']} latent channels; "
        f"guide: SegFormer (mmseg, random init) at {sizes.segformer_px} px",
        "",
        "## Training step (train.py's step: cached latents, autocast to the compute dtype, gradient checkpointing)",
        "",
        *table(["mode", "px", "batch", "s/step", "peak GiB", "TFLOP/step", "TFLOP/s", "MFU", "GPU busy"], report.train),
        "",
        "TFLOP/step: model FLOPs of forward + backward (the recomputation of gradient checkpointing not counted). "
        "GPU busy: kernel time of one profiled call over its timed wall time; well under 100 % means the host "
        "(Python, kernel launches) sets the pace.",
        "",
        f"## Sampling (MaskToImagePipeline, {sizes.sample_px} px, batch {sizes.sample_batch})",
        "",
        *table(["sampler", "steps", "s/batch", "images/s", "peak GiB", "GPU busy"], report.sampling),
        "",
        "## Attention: PyTorch SDPA vs xformers",
        "",
        *(
            table(["measurement", "SDPA", "xformers"], report.attention)
            if report.attention
            else ["xformers is not installed (or no CUDA): SDPA only."]
        ),
        "",
        *[f"- {note}" for note in report.notes],
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at small sizes (needs --out)")
    parser.add_argument("--out", default=None, help=f"results file (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    parser.add_argument("--budget_s", type=float, default=420.0, help="time budget; later measurements are skipped")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "adafactor"), default="adamw", help="train.py's")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.smoke and args.out is None:
        raise UsageError(f"--smoke needs --out (its numbers must not replace {DEFAULT_OUT.relative_to(REPO)})")
    if not args.smoke and not torch.cuda.is_available():
        raise UsageError("no CUDA device: this check is for a GPU machine (--smoke --out FILE runs it on the CPU)")
    if args.optimizer == "adamw8bit" and not torch.cuda.is_available():
        raise UsageError("--optimizer adamw8bit needs CUDA")
    start = time.monotonic()
    device = torch.device("cuda" if not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = Sizes.smoke() if args.smoke else Sizes.full()
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: extra threads only fight other jobs for a shared CPU
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    report, clock = Report(name), Clock(args.budget_s)
    with tempfile.TemporaryDirectory() as work:
        parts = (
            lambda: measure_training(sizes, device, dtype, args, report, clock, Path(work)),
            lambda: measure_sampling(sizes, device, dtype, report, clock, Path(work)),
        )
        for name, part in zip(("training", "sampling"), parts, strict=True):
            try:
                part()
            except Exception as exc:  # a GPU run is scarce: a failed part must not lose what the others measured
                traceback.print_exc()
                report.notes.append(f"the {name} measurements failed: {one_line(exc)}")
            free_memory(device)
    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report, sizes, args, dtype, time.monotonic() - start))
    print(f"[gpu_check] {time.monotonic() - start:.0f} s; results in {out}")
    return 0


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
