"""The reflow objective family: 2-rectified flow, k-SeqRF and distillation (`train.py --reflow_pairs DIR`).

A pair (from `python -m crfm.reflow`, read by `crfm.fewstep.pair_dataset`) is the teacher's path through K_p + 1
points of the uniform σ grid: z_0 = the noise (σ = 1, redrawn from its seed and item id), z_1 … z_{K_p−1} (the
stored segment boundaries) and z_{K_p} = the clean latent (σ = 0). With `seqrf_segments` K (K divides K_p) a step
draws a segment k of [σ_{k+1}, σ_k] and a σ in it by `t_schedule`, puts x on the straight line between the
segment's end points and regresses the model's velocity onto that line's velocity (z_k − z_{k+1}) / (σ_k − σ_{k+1}):

- K = 1 is 2-rectified flow (Liu et al.): the line from the noise to the teacher's image;
- K > 1 is k-SeqRF (the PeRFlow/SeqRF piecewise form): each segment is straightened on its own, so a K-step
  Euler sampler on the uniform grid follows the teacher's boundaries;
- `t_schedule` (in σ = 1 − t of the rectified-flow papers, per segment): `uniform` σ ~ U, `t0` the segment's noisy
  end σ_k (one-step-per-segment distillation; `--distill` selects it), `t1` its clean end σ_{k+1}, an integer M the
  M starts σ_k − j (σ_k − σ_{k+1}) / M, j < M (M Euler steps per segment).

Losses on the velocity error δ (C×h×w = d numbers): `l2` mean δ², `pseudo_huber` √(‖δ‖² + c²) − c with
c = 0.00054 √d (2-RF++), `lpips` LPIPS between the decoded predicted and teacher segment end (needs the `lpips`
package and its backbone's weights on disk; nothing is downloaded), `lpips+l2` both.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from crfm.fewstep.pair_dataset import ReflowPairs, segment_boundaries
from crfm.models.conditioning import encode_mask_condition, vae_scale_factor
from crfm.training.objective import (
    FlowMatchingLoss,
    LossFn,
    Objective,
    TrainTimesteps,
    predict,
    prompts_with_dropout,
)
from crfm.utils.flags import UsageError, add_settings_flags, option, positive_int, settings_from_args

T_SCHEDULES = ("uniform", "t0", "t1")  # or a positive integer M
REFLOW_LOSSES = ("l2", "pseudo_huber", "lpips", "lpips+l2")


def parse_t_schedule(value: str) -> str:
    """argparse type of --t_schedule: one of T_SCHEDULES or a positive integer."""
    if value in T_SCHEDULES or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(T_SCHEDULES)} or a positive integer, got {value!r}")


@dataclass(frozen=True)
class ReflowConfig:
    """How a student is trained on pairs; `add_flags` makes train.py's reflow flags. num_cls, mask_encoding and
    prompt_dropout are flags of the data, model and objective groups; the boundaries come from the pairs' grid."""

    num_cls: int
    mask_encoding: str
    boundaries: tuple[float, ...]  # σ_0 = 1 > … > σ_K = 0 of the trained segments
    t_schedule: str = option("uniform", "sigma in a segment: uniform, t0, t1 or M", kind=parse_t_schedule)
    reflow_loss: str = option("l2", "loss on the velocity (lpips: decoded ends)", choices=REFLOW_LOSSES)
    prompt_dropout: float = 0.1
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        try:
            parse_t_schedule(self.t_schedule)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"t_schedule {exc}") from exc
        if self.reflow_loss not in REFLOW_LOSSES:
            raise ValueError(f"reflow_loss must be one of {REFLOW_LOSSES}, got {self.reflow_loss!r}")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """The fields' flags, with those of the run that reads the pairs (folder, teacher, segments, LPIPS)."""
        group = parser.add_argument_group("reflow (training on python -m crfm.reflow's pairs)")
        add = group.add_argument
        add("--reflow_pairs", default=None, help="pairs folder: train a 2-RF / k-SeqRF / distilled model on it")
        add("--init_ckpt", default=None, help="start from this trained checkpoint (the 1-RF teacher), same train mode")
        add_settings_flags(cls, group)
        add("--distill", dest="t_schedule", action="store_const", const="t0", help="= --t_schedule t0 (1 step/segment)")
        add("--seqrf_segments", type=positive_int, default=1, help="K segments (k-SeqRF; 1: 2-rectified flow)")
        add("--lpips_weights", default=None, help="local backbone weights for --reflow_loss lpips (never downloaded)")

    @property
    def segments(self) -> int:
        return len(self.boundaries) - 1


def draw_sigmas(config: ReflowConfig, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(segment [B], σ [B], σ_k [B], σ_{k+1} [B]) by the t-schedule; draws the segment, then the place in it."""
    bounds = torch.tensor(config.boundaries, dtype=torch.float32)
    segment = torch.randint(0, config.segments, (batch,), generator=generator)
    high, low = bounds[segment], bounds[segment + 1]
    if config.t_schedule == "uniform":
        fraction = torch.rand(batch, generator=generator)
    elif config.t_schedule == "t0":
        fraction = torch.ones(batch)
    elif config.t_schedule == "t1":
        fraction = torch.zeros(batch)
    else:
        steps = int(config.t_schedule)
        fraction = 1.0 - torch.randint(0, steps, (batch,), generator=generator).float() / steps
    return segment, low + fraction * (high - low), high, low


def pseudo_huber(error: torch.Tensor) -> torch.Tensor:
    """Per sample √(‖δ‖² + c²) − c, c = 0.00054 √d (the constant of 2-RF++ / improved consistency training)."""
    flat = error.flatten(1)
    c = 0.00054 * flat.shape[1] ** 0.5
    return (flat.pow(2).sum(dim=1) + c * c).sqrt() - c


def reflow_loss(
    model,
    vae,
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    config: ReflowConfig,
    empty_prompt: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    perceptual=None,
) -> FlowMatchingLoss:
    """The reflow loss of one batch of `ReflowPairs` items; draws (segment, σ, prompt dropout) from `generator`.
    `perceptual` (for the lpips losses): images in [-1, 1] pairs -> per-sample distance."""
    path = batch["path"]
    batch_size, device = path.shape[0], path.device
    segment, sigma, high, low = draw_sigmas(config, batch_size, generator)
    rows = torch.arange(batch_size)
    start, end = path[rows, segment.to(device)].float(), path[rows, segment.to(device) + 1].float()
    view = (-1, 1, 1, 1)
    sigma_, high_, low_ = (s.to(device).view(view) for s in (sigma, high, low))
    noisy = (end + (sigma_ - low_) / (high_ - low_) * (start - end)).to(dtype)
    target = (start - end) / (high_ - low_)
    with torch.no_grad():
        mask_latents = encode_mask_condition(vae, batch["label"], config.num_cls, config.mask_encoding).to(dtype)

    embeds, pooled = prompts_with_dropout(batch, empty_prompt, config.prompt_dropout, generator, device, dtype)
    timesteps = (sigma * config.num_train_timesteps).to(device)  # the scheduler's t = σ · num_train_timesteps
    pred = predict(model, noisy, embeds, pooled, timesteps, mask_latents).float()
    error = pred - target
    per_sample = torch.zeros(batch_size, device=device)
    if config.reflow_loss in ("l2", "lpips+l2"):
        per_sample = per_sample + error.pow(2).mean(dim=(1, 2, 3))
    if config.reflow_loss == "pseudo_huber":
        per_sample = pseudo_huber(error)
    if config.reflow_loss.startswith("lpips"):
        from crfm.sampling.sampler import decode_latents

        predicted_end = noisy.float() - (sigma_ - low_) * pred  # one Euler step to the segment's clean end
        per_sample = per_sample + perceptual(decode_latents(vae, predicted_end), decode_latents(vae, end)).view(-1)
    return FlowMatchingLoss(per_sample.mean(), per_sample.detach(), timesteps, sigma_)


def load_lpips(weights: str | None, device) -> torch.nn.Module:
    """LPIPS (VGG) from the `lpips` package with its backbone's weights read from the local file `weights`
    (torchvision's vgg16 state dict); refuses, in one line, when either is missing. Nothing is downloaded."""
    hint = (
        "--reflow_loss lpips needs the `lpips` package (pip install lpips; it brings torchvision) and the VGG16 "
        "backbone's weights on disk (--lpips_weights vgg16-397923af.pth, torchvision's file); crfm never downloads "
        "weights. Use --reflow_loss l2 or pseudo_huber otherwise."
    )
    if weights is None or not Path(weights).is_file():
        raise UsageError(f"{hint} (--lpips_weights: {weights or 'not given'})")
    try:
        import lpips
    except ImportError as exc:
        raise UsageError(f"{hint} ({exc})") from exc
    metric = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # linear heads ship with lpips
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for part in (metric.net.slice1, metric.net.slice2, metric.net.slice3, metric.net.slice4, metric.net.slice5):
        for index, module in part.named_children():  # the slices hold torchvision's features.<index> modules
            params = {name: state[f"features.{index}.{name}"] for name, _ in module.named_parameters()}
            if params:
                module.load_state_dict(params)
    return metric.eval().requires_grad_(False).to(device)


class ReflowObjective(Objective):
    """Training on `python -m crfm.reflow`'s pairs (`--reflow_pairs`): `reflow_loss` on `ReflowPairs`, with the
    segments' σ boundaries read from the pairs' grid (the base's scheduler): `loss` follows `dataset`."""

    perceptual: torch.nn.Module | None = None  # LPIPS, for the lpips losses (`prepare`)
    pairs: ReflowPairs | None = None  # the dataset, whose record holds the pairs' grid

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        ReflowConfig.add_flags(parser)

    def check(self) -> None:
        if self.args.latents_path is not None:
            raise UsageError("--latents_path serves the flow-matching objective; --reflow_pairs brings its own latents")

    def prepare(self, device) -> None:
        args = self.args
        self.perceptual = load_lpips(args.lpips_weights, device) if args.reflow_loss.startswith("lpips") else None

    def dataset(self) -> ReflowPairs:
        args = self.args
        self.pairs = ReflowPairs(
            args.reflow_pairs,
            Path(args.data_root),
            Path(args.vectors_path),
            args.num_cls,
            args.resolution,
            args.seqrf_segments,
        )
        return self.pairs

    def record(self) -> dict:
        """How the student was trained (its segments follow the uniform grid: sample it with --sigma_grid uniform)."""
        args = self.args
        reflow = {
            "pairs": str(Path(args.reflow_pairs).resolve()),
            "init_ckpt": None if args.init_ckpt is None else str(Path(args.init_ckpt).resolve()),
            "t_schedule": args.t_schedule,
            "loss": args.reflow_loss,
            "segments": args.seqrf_segments,
        }
        return {"reflow": reflow}

    def loss(self, model, vae, schedule: TrainTimesteps, empty: Mapping, dtype: torch.dtype) -> LossFn:
        from diffusers import FlowMatchEulerDiscreteScheduler

        args = self.args
        base = args.pretrained_model_name_or_path
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        side = args.resolution // vae_scale_factor(vae)
        patch = getattr(model, "module", model).transformer.config.patch_size  # `model` may be wrapped by accelerate
        boundaries = segment_boundaries(scheduler, self.pairs.meta, args.seqrf_segments, (side, side), patch)
        config = settings_from_args(
            ReflowConfig, args, boundaries=boundaries, num_train_timesteps=scheduler.config.num_train_timesteps
        )
        if config.reflow_loss.startswith("lpips") and self.perceptual is None:
            raise ValueError("the lpips losses need `prepare` (load_lpips) first")

        def objective(batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
            return reflow_loss(model, vae, batch, generator, config, empty, dtype, self.perceptual).loss

        return objective
