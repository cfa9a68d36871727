"""Training on reflow pairs: 2-rectified flow, k-SeqRF and distillation (`train.py --reflow_pairs DIR`).

A pair (from `python -m crfm.reflow`) is the teacher's path through K_p + 1 points of the uniform σ grid: z_0 =
the noise (σ = 1, redrawn from its seed and item id), z_1 … z_{K_p−1} (the stored segment boundaries) and z_{K_p} =
the clean latent (σ = 0). With `seqrf_segments` K (K divides K_p) a step draws a segment k of [σ_{k+1}, σ_k] and a
σ in it by `t_schedule`, puts x on the straight line between the segment's end points and regresses the
model's velocity onto that line's velocity (z_k − z_{k+1}) / (σ_k − σ_{k+1}):

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

from crfm.data.dataset import PairDataset
from crfm.data.index import DatasetError, read_index
from crfm.models.conditioning import encode_mask_condition
from crfm.training.objective import FlowMatchingLoss, predict, prompts_with_dropout
from crfm.utils.fileio import read_json
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


def read_pairs_meta(pairs_dir: str | Path) -> dict:
    from crfm.fewstep.pairs import PAIRS_FORMAT, PAIRS_META

    path = Path(pairs_dir) / PAIRS_META
    if not path.is_file():
        raise DatasetError(f"{path} not found: --reflow_pairs must be a folder written by python -m crfm.reflow")
    meta = read_json(path, "the pairs' record")
    if meta.get("format") != PAIRS_FORMAT:
        raise DatasetError(f"{path}: format {meta.get('format')!r}, expected {PAIRS_FORMAT}")
    return meta


def trained_grid_indices(meta: Mapping, segments: int) -> tuple[int, ...]:
    """Grid indices 0, …, N of the boundaries of `segments` equal segments of the pairs' N-step uniform grid; the
    inner ones must be stored, so `segments` must divide the pairs' own --segments."""
    from crfm.fewstep.pairs import segment_indices

    stored = int(meta["segments"])
    if segments < 1 or stored % segments:
        raise UsageError(f"--seqrf_segments {segments} must divide the pairs' --segments {stored}")
    steps = int(meta["num_inference_steps"])
    return (0, *segment_indices(steps, segments), steps)


def segment_boundaries(scheduler, meta: Mapping, segments: int, latent_hw: tuple[int, int], patch: int) -> tuple:
    """σ at the boundaries of `segments` equal segments of the pairs' uniform grid (`trained_grid_indices`)."""
    from crfm.sampling.sampler import set_timesteps

    set_timesteps(scheduler, int(meta["num_inference_steps"]), latent_hw, patch, "cpu", "uniform")
    return tuple(float(scheduler.sigmas[i]) for i in trained_grid_indices(meta, segments))


class ReflowPairs(torch.utils.data.Dataset):
    """The pairs of `pairs_dir` with their masks and prompt vectors (from `data_root`/`vectors_dir`, the dataset the
    pairs were made from). Items: `path` [K + 1, C, h, w] (noise, boundaries, clean latent), `label`,
    `prompt_embeds`, `pooled_prompt_embeds`, `position`."""

    def __init__(
        self, pairs_dir: str | Path, data_root: str | Path, vectors_dir: str | Path, num_cls: int, resolution: int,
        segments: int = 1,
    ) -> None:  # fmt: skip
        self.pairs_dir = Path(pairs_dir)
        self.meta = read_pairs_meta(pairs_dir)
        for key, value in (("num_cls", num_cls), ("resolution", resolution)):
            if self.meta[key] != value:
                raise UsageError(f"the pairs in {pairs_dir} were made with {key} {self.meta[key]}, not {value}")
        self.keys = [f"state_{i}" for i in trained_grid_indices(self.meta, segments)[1:-1]]
        self.items = read_index(self.pairs_dir / "index.jsonl", data_root)
        self.base = PairDataset(self.items, data_root, resolution=resolution, num_cls=num_cls, vectors_dir=vectors_dir)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        from crfm.fewstep.pairs import load_pair_latents
        from crfm.sampling.sampler import initial_noise

        sample = dict(self.base[position])
        del sample["image"], sample["prompt"]  # the teacher's latents stand for the image
        record = self.items[position].record
        stored = load_pair_latents(self.pairs_dir, record)
        noise = initial_noise([record["noise_id"]], record["seed"], tuple(stored["latents"].shape))[0]
        sample["path"] = torch.stack([noise, *(stored[k] for k in self.keys), stored["latents"]])
        return sample


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


def build_reflow_loss(
    args: argparse.Namespace, dataset: ReflowPairs, model, vae, empty: Mapping, dtype: torch.dtype, perceptual=None
):
    """train.py's objective for --reflow_pairs: (batch, generator) -> loss, with the segments' σ boundaries read
    from the pairs' grid (the base's scheduler). `perceptual`: `load_lpips(...)` for the lpips losses."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from crfm.models.conditioning import vae_scale_factor

    base = args.pretrained_model_name_or_path
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    side = args.resolution // vae_scale_factor(vae)
    patch = getattr(model, "module", model).transformer.config.patch_size  # `model` may be wrapped by accelerate
    config = settings_from_args(
        ReflowConfig,
        args,
        boundaries=segment_boundaries(scheduler, dataset.meta, args.seqrf_segments, (side, side), patch),
        num_train_timesteps=scheduler.config.num_train_timesteps,
    )
    if args.reflow_loss.startswith("lpips") and perceptual is None:
        raise ValueError("the lpips losses need `perceptual` (load_lpips)")

    def objective(batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return reflow_loss(model, vae, batch, generator, config, empty, dtype, perceptual).loss

    return objective
