"""The rectified-flow objective of SD3, with the mask as an extra condition (stage (a) of the paper).

As in diffusers' SD3 training examples: x_t = (1 - σ) x + σ ε, the model predicts the velocity ε - x, timesteps
are drawn from `compute_density_for_timestep_sampling` on the scheduler's training grid and the squared error
is weighted by `compute_loss_weighting_for_sd3`. Every random draw of a step comes from one generator, in a fixed
order (flip, quarter turns if on, translations if on, posterior sample, noise, timestep density, prompt dropout,
mask dropout if on);
`step_generator` makes that generator a pure function of (seed, rank, micro-step), so a resumed run draws exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from crfm.data.latents import FLIPPED, LATENT_KEY, MASK_KEY
from crfm.models.conditioning import (
    DEFAULT_MASK_ENCODING,
    check_mask_encoding,
    encode_latents,
    encode_mask_condition,
    has_null_mask,
    mask_to_class_fractions,
    null_mask_condition,
    scaled_posterior_sample,
)
from crfm.utils.flags import (
    UsageError,
    add_settings_flags,
    bounded,
    non_negative,
    option,
    positive_float,
    probability,
    settings_from_args,
)

WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """A generator for one micro-step: draws are a pure function of (seed, rank, step), hence resumable."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63))


@dataclass(frozen=True)
class FlowMatchingConfig:
    """What a training step draws and how it weights the loss. `add_flags` makes train.py's flags of the same names;
    num_cls, flip_prob and mask_encoding are flags of the shared data, pair and model groups."""

    num_cls: int
    weighting_scheme: str = option("logit_normal", "SD3 timestep density / loss weighting", choices=WEIGHTING_SCHEMES)
    logit_mean: float = option(0.0, "logit-normal mean (> 0 favours noisier timesteps)")
    logit_std: float = option(1.0, "logit-normal std", kind=positive_float)
    mode_scale: float = option(1.29, "scale of the 'mode' weighting scheme")
    # Logit-normal draws almost never reach the clean end (σ <= 0.03: 2.5e-4 of them), where a fine-tuned generator's
    # velocity is then left to chance: spikes there ruin a 40-step uniform path (bench/results_fewstep_s1800.md).
    uniform_timestep_share: float = option(
        0.0,
        "share of the timestep draws taken uniformly over [0, 1] instead of from --weighting_scheme's density, so "
        "that every σ is trained (0: off)",
        kind=probability,
    )
    # Probability of the empty prompt (trains the unconditional branch of CFG).
    prompt_dropout: float = option(0.1, "probability of the empty prompt (for CFG)", kind=probability)
    flip_prob: float = 0.5  # horizontal flip of image and mask together
    # Drawn after the flip, only when on. Not a pair flag: a latent cache cannot hold turned pairs.
    rot90: bool = option(
        False,
        "random quarter turns of image and mask together (aerial scenes have no up; with flips: 8 views of each "
        "pair); drawn on pixels, so not with --latents_path",
    )
    # Drawn after the turns, only when on. With 16 pairs the generator learns where their roofs lie on the token grid,
    # not how to draw one anywhere: shifts show each pair at every sub-token phase. Pixels, so not with a cache.
    translate: int = option(
        0,
        "random translations of image and mask together by up to this many px along each axis, wrapping around "
        "(0: off); drawn on pixels, so not with --latents_path",
        kind=bounded(int, 0),
    )
    # Small classes (roads, roofs) hold few latent cells, so the plain loss barely asks for them.
    class_balance: float = option(
        0.0,
        "weight each latent cell's squared error by its classes' share of the batch's pixels to the power -POWER "
        "(0: off, the plain loss; 0.5: a class 9x rarer weighs 3x more), weights of a batch averaging 1; needs the "
        "labels: pixels, or a onehot latent cache",
        kind=non_negative,
    )
    # Teaches the model what to draw without a mask, the unconditional branch of mask guidance at sampling.
    mask_dropout: float = option(
        0.0,
        "probability of the null mask (all -1, onehot encoding only): trains the unconditional branch of test.py's "
        "--mask_guidance_scale",
        kind=probability,
    )
    use_mask: bool = True  # False: the `--no_mask` ablation, the model sees no mask
    mask_encoding: str = DEFAULT_MASK_ENCODING  # crfm.models.conditioning.MASK_ENCODINGS

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        check_mask_encoding(self.mask_encoding)
        if self.mask_dropout and not (self.use_mask and has_null_mask(self.mask_encoding)):
            raise UsageError("--mask_dropout needs the mask (not --no_mask) and --mask_encoding onehot")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        add_settings_flags(cls, parser.add_argument_group("objective"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FlowMatchingConfig:
        # use_mask is the --no_mask ablation negated; every other field is the flag of the same name.
        return settings_from_args(cls, args, use_mask=not args.no_mask)


@dataclass(frozen=True)
class TrainTimesteps:
    """The scheduler's training grid: σ_i and t_i = σ_i · num_train_timesteps (diffusers' SD3 example)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler) -> TrainTimesteps:
        """From a freshly loaded `FlowMatchEulerDiscreteScheduler` (before any `set_timesteps`)."""
        return cls(scheduler.sigmas.clone(), scheduler.timesteps.clone(), scheduler.config.num_train_timesteps)

    def lookup(self, u: torch.Tensor, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Density draws u in [0, 1] -> (timesteps [B], sigmas [B, 1, 1, 1]) of the nearest grid points below."""
        indices = (u * self.num_train_timesteps).long().clamp_max(len(self.timesteps) - 1)
        timesteps = self.timesteps[indices].to(device)
        sigmas = self.sigmas[indices].to(device, dtype).view(-1, 1, 1, 1)
        return timesteps, sigmas


class FlowMatchingLoss(NamedTuple):
    loss: torch.Tensor  # scalar, the mean over the batch (what is back-propagated)
    per_sample: torch.Tensor  # [B], float32
    timesteps: torch.Tensor  # [B], the timesteps the model was given
    sigmas: torch.Tensor  # [B, 1, 1, 1]


def encode_pair(
    vae,
    image: torch.Tensor,
    label: torch.Tensor,
    num_cls: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    mask_encoding: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (posterior sample, from `generator`) and label maps (in `mask_encoding`, deterministic) -> latents
    and mask condition in `dtype`."""
    with torch.no_grad():
        latents = encode_latents(vae, image.float(), generator=generator).to(dtype)
        mask_latents = encode_mask_condition(vae, label, num_cls, mask_encoding).to(dtype)
    return latents, mask_latents


def cached_pair(
    batch: Mapping[str, torch.Tensor],
    flip: torch.Tensor,
    generator: torch.Generator,
    vae_config,
    dtype: torch.dtype,
    use_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode_pair`'s result from a latent cache's batch (`crfm.data.latents`): for flipped items the stored
    flipped pair, latents sampled with `generator` from the stored posterior as from a fresh encode."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def chosen(key: str) -> torch.Tensor:
        stored, flipped = batch[key], batch.get(key + FLIPPED)
        if flipped is None:
            if flip.any():
                raise ValueError("a flip was drawn but the latent cache has no flipped pairs (made with --flip_prob 0)")
            return stored
        return torch.where(flip.view(-1, *[1] * (stored.dim() - 1)), flipped, stored)

    posterior = DiagonalGaussianDistribution(chosen(LATENT_KEY).float())
    latents = scaled_posterior_sample(posterior, generator, vae_config).to(dtype)
    return latents, (chosen(MASK_KEY).to(dtype) if use_mask else None)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor | float) -> torch.Tensor:
    """The rectified-flow path x_t = (1 - σ) x + σ ε."""
    return (1.0 - sigmas) * latents + sigmas * noise


def predict(model, noisy, embeds, pooled, timesteps, mask_latents: torch.Tensor | None) -> torch.Tensor:
    """The model's velocity prediction; `mask_latents=None` runs it without the mask branch (and then `model`
    may also be a plain `SD3Transformer2DModel`, as in text-to-image pretraining)."""
    if mask_latents is None:
        return model(noisy, embeds, pooled, timesteps, return_dict=False)[0]
    return model(noisy, embeds, pooled, timesteps, mask_hidden_states=mask_latents, return_dict=False)[0]


def prompts_with_dropout(
    batch: Mapping[str, torch.Tensor],
    empty_prompt: Mapping[str, torch.Tensor],
    probability: float,
    generator: torch.Generator,
    device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's prompt vectors, each replaced by the empty prompt's with `probability` (one draw per item)."""
    drop = (torch.rand(batch["prompt_embeds"].shape[0], generator=generator) < probability).to(device)
    embeds = batch["prompt_embeds"].to(device, dtype)
    pooled = batch["pooled_prompt_embeds"].to(device, dtype)
    empty_embeds = empty_prompt["prompt_embeds"].to(device, dtype)
    empty_pooled = empty_prompt["pooled_prompt_embeds"].to(device, dtype)
    embeds = torch.where(drop[:, None, None], empty_embeds.expand_as(embeds), embeds)
    pooled = torch.where(drop[:, None], empty_pooled.expand_as(pooled), pooled)
    return embeds, pooled


def quarter_turns(batch: torch.Tensor, turns: list[int] | None) -> torch.Tensor:
    """Item i turned by `turns[i]` quarter turns in its last two (square) dimensions; `None`: unchanged."""
    if turns is None:
        return batch
    return torch.stack([item.rot90(k, dims=(-2, -1)) for item, k in zip(batch, turns, strict=True)])


def translations(batch: torch.Tensor, shifts: torch.Tensor | None) -> torch.Tensor:
    """Item i rolled by `shifts[i]` = (rows, columns) px in its last two dimensions, wrapping around (the pair's
    image and mask roll alike, so they stay aligned); `None`: unchanged."""
    if shifts is None:
        return batch
    return torch.stack([item.roll(shift.tolist(), dims=(-2, -1)) for item, shift in zip(batch, shifts, strict=True)])


def class_balanced_weights(fractions: torch.Tensor, power: float) -> torch.Tensor:
    """[B, K, h, w] class fractions per latent cell -> [B, 1, h, w] loss weights averaging 1: a cell weighs the sum
    of its classes' fractions times (the class's share of all labelled fractions in the batch) ** -power; a cell's
    ignored share weighs the mean weight of the classes present."""
    share = fractions.sum(dim=(0, 2, 3))
    present = share > 0
    share = share / share.sum().clamp_min(1e-12)
    class_weight = torch.where(present, share.clamp_min(1e-12) ** -power, torch.zeros_like(share))
    mean_weight = class_weight[present].mean() if present.any() else torch.ones(())
    labelled = fractions.sum(dim=1, keepdim=True)
    weights = (fractions * class_weight.view(1, -1, 1, 1)).sum(dim=1, keepdim=True) + (1 - labelled) * mean_weight
    return weights / weights.mean().clamp_min(1e-12)


def flow_matching_loss(
    model,
    vae,
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    config: FlowMatchingConfig,
    schedule: TrainTimesteps,
    empty_prompt: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> FlowMatchingLoss:
    """The weighted rectified-flow loss of one batch: `PairDataset` items (image, label, prompt vectors), or
    `LatentPairDataset` items (cached posterior parameters and mask condition instead of image and label; then
    `vae` may be a `crfm.data.latents.VAEConfig`, only its config is read).

    `generator` (a CPU generator, e.g. `step_generator(...)`) makes every random draw, in this order: flip,
    quarter turns (only with `rot90`), translations (only with `translate`), VAE posterior sample, noise, timestep
    density, its uniform share (only with `uniform_timestep_share`), prompt dropout, mask dropout (only with
    `mask_dropout`); cached and fresh latents take the same draws.
    `empty_prompt` holds the empty prompt's `prompt_embeds` [L, D] and `pooled_prompt_embeds` [P], swapped in for
    dropped prompts; `dtype` is the compute dtype of latents and text (the VAE itself runs in its own dtype). The
    VAE is not differentiated through.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    first = batch[LATENT_KEY] if LATENT_KEY in batch else batch["image"]
    flip = (torch.rand(first.shape[0], generator=generator) < config.flip_prob).to(first.device)
    # Drawn only when on, so runs without it keep every later draw (and their results) unchanged.
    turns = torch.randint(4, (first.shape[0],), generator=generator).tolist() if config.rot90 else None
    reach = config.translate
    shifts = torch.randint(-reach, reach + 1, (first.shape[0], 2), generator=generator) if reach else None
    fractions = None  # class fractions per latent cell, for `class_balance`
    if LATENT_KEY in batch:
        if turns is not None or shifts is not None:
            raise ValueError("quarter turns and translations are drawn on pixels; a latent cache stores neither")
        latents, mask_latents = cached_pair(batch, flip, generator, vae.config, dtype, config.use_mask)
        if config.class_balance and config.mask_encoding == "onehot":
            fractions = mask_latents.float()
    else:
        image = torch.where(flip[:, None, None, None], batch["image"].flip(-1), batch["image"])
        image = translations(quarter_turns(image, turns), shifts)
        if config.use_mask:
            label = torch.where(flip[:, None, None], batch["label"].flip(-1), batch["label"])
            label = translations(quarter_turns(label, turns), shifts)
            latents, mask_latents = encode_pair(
                vae, image, label, config.num_cls, dtype, generator, config.mask_encoding
            )
            if config.class_balance:
                factor = label.shape[-1] // latents.shape[-1]
                fractions = mask_to_class_fractions(label.to(latents.device), config.num_cls, factor)
        else:  # text-to-image (pretraining, or the --no_mask ablation): no label is read or encoded
            with torch.no_grad():
                latents, mask_latents = encode_latents(vae, image.float(), generator=generator).to(dtype), None
    batch_size, device = latents.shape[0], latents.device

    noise = torch.randn(latents.shape, generator=generator).to(latents)
    u = compute_density_for_timestep_sampling(
        config.weighting_scheme,
        batch_size,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        generator=generator,
    )
    if config.uniform_timestep_share:  # drawn only when on, like the mask dropout
        uniform = torch.rand(batch_size, generator=generator) < config.uniform_timestep_share
        u = torch.where(uniform, torch.rand(batch_size, generator=generator), u)
    timesteps, sigmas = schedule.lookup(u, device, latents.dtype)
    noisy = noisy_latents(latents, noise, sigmas)

    embeds, pooled = prompts_with_dropout(batch, empty_prompt, config.prompt_dropout, generator, device, dtype)
    if config.mask_dropout:  # drawn only when on, like the quarter turns
        drop = (torch.rand(batch_size, generator=generator) < config.mask_dropout).to(device)
        null = null_mask_condition(mask_latents, config.mask_encoding)
        mask_latents = torch.where(drop.view(-1, 1, 1, 1), null, mask_latents)
    pred = predict(model, noisy, embeds, pooled, timesteps, mask_latents)
    weighting = compute_loss_weighting_for_sd3(config.weighting_scheme, sigmas)
    squared = weighting.float() * (pred.float() - (noise - latents).float()) ** 2
    if config.class_balance:
        if fractions is None:
            raise ValueError("class_balance needs the labels: pixels with a mask, or a onehot latent cache")
        squared = squared * class_balanced_weights(fractions, config.class_balance)
    per_sample = squared.mean(dim=(1, 2, 3))
    return FlowMatchingLoss(per_sample.mean(), per_sample, timesteps, sigmas)


@torch.no_grad()
def mask_following_losses(
    model,
    vae,
    dataset,
    num_cls: int,
    mask_encoding: str,
    sigmas: tuple[float, ...] = (0.3, 0.6, 0.9),
    seed: int = 0,
) -> dict[str, float]:
    """Flow-matching loss on `dataset` with each item's own mask, with another item's mask, and with none.

    `mask_encoding` must be the one `model` was trained with (its checkpoint's).

    The gap between the first two measures how much the model follows the mask; noise and timesteps are
    fixed by `seed`, so numbers are comparable across models. Unweighted, at fixed σ, the timestep σ · 1000.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    scheduler_timesteps = 1000.0
    totals = {"own_mask": 0.0, "other_mask": 0.0, "no_mask": 0.0}
    count = 0
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([s["image"] for s in samples]).to(device)
    labels = torch.stack([s["label"] for s in samples]).to(device)
    gen = torch.Generator().manual_seed(seed)
    latents, masks = encode_pair(vae, images, labels, num_cls, dtype, gen, mask_encoding)
    other = masks.roll(1, dims=0)  # each item gets its neighbour's mask
    embeds = torch.stack([s["prompt_embeds"] for s in samples]).to(device, dtype)
    pooled = torch.stack([s["pooled_prompt_embeds"] for s in samples]).to(device, dtype)
    for sigma in sigmas:
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        noisy = noisy_latents(latents, noise, sigma)
        timestep = torch.full((len(samples),), sigma * scheduler_timesteps, device=device)
        target = (noise - latents).float()
        for key, condition in (("own_mask", masks), ("other_mask", other), ("no_mask", None)):
            pred = predict(model, noisy, embeds, pooled, timestep, condition)
            totals[key] += (pred.float() - target).pow(2).mean().item()
        count += 1
    return {key: value / count for key, value in totals.items()}


LossFn = Callable[[Mapping[str, torch.Tensor], torch.Generator], torch.Tensor]


class Objective:
    """What the training loop needs from an objective, so the loop holds no objective's branches: its flags, the
    checks of its inputs, anything it loads that can fail, its dataset, its entry in the checkpoint record and its
    loss of a batch. Built from the parsed flags; `crfm.training.build.objective_for` picks the run's."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Refuse flags that cannot work, before anything is built or written."""

    def prepare(self, device) -> None:
        """Load what the loss needs besides the model (before the seed is set: its draws change no run)."""

    def dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def record(self) -> dict:
        """Entries of the checkpoint's record (`crfm_checkpoint.json`) that say how the weights were trained."""
        return {}

    def loss(self, model, vae, schedule: TrainTimesteps, empty: Mapping, dtype: torch.dtype) -> LossFn:
        """(batch, generator) -> the scalar loss to back-propagate."""
        raise NotImplementedError


class FlowMatchingObjective(Objective):
    """SD3's rectified-flow objective on image–mask pairs (`flow_matching_loss`), from pixels or a latent cache."""

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        FlowMatchingConfig.add_flags(parser)

    def check(self) -> None:
        args = self.args
        FlowMatchingConfig.from_args(args)  # its own refusals (e.g. --mask_dropout without a onehot mask)
        if args.class_balance and (args.no_mask or (args.latents_path and args.mask_encoding != "onehot")):
            raise UsageError(
                "--class_balance weighs latent cells by their classes: it needs the mask (not --no_mask) and, with "
                "--latents_path, a onehot cache (--mask_encoding onehot)"
            )
        if args.latents_path is None:
            return
        from crfm.data.latents import check_latent_cache

        if args.rot90:
            raise UsageError("--rot90 turns pixels before encoding; a latent cache holds no turned pairs: drop one")
        if args.translate:
            raise UsageError(
                "--translate shifts pixels before encoding; a latent cache holds no shifted pairs: drop one"
            )
        check_latent_cache(
            args.latents_path,
            args.pretrained_model_name_or_path,
            args.resolution,
            args.mask_encoding,
            args.num_cls,
            args.flip_prob,
        )

    def record(self) -> dict:
        """Mask dropout, when on: it is what makes the checkpoint usable with mask guidance."""
        return {"mask_dropout": self.args.mask_dropout} if self.args.mask_dropout else {}

    def dataset(self) -> torch.utils.data.Dataset:
        """With --latents_path the cached latents of the index's items (no image or label is decoded)."""
        from crfm.data.dataset import PairDataset
        from crfm.data.index import read_index
        from crfm.data.latents import LatentPairDataset

        args = self.args
        data_root, vectors_dir = Path(args.data_root), Path(args.vectors_path)
        if args.latents_path is not None:
            items = read_index(data_root / args.json_file, data_root, check_files=False)
            return LatentPairDataset(items, args.latents_path, vectors_dir, flips=args.flip_prob > 0)
        items = read_index(data_root / args.json_file, data_root)
        return PairDataset(items, data_root, args.resolution, num_cls=args.num_cls, vectors_dir=vectors_dir)

    def loss(self, model, vae, schedule: TrainTimesteps, empty: Mapping, dtype: torch.dtype) -> LossFn:
        config = FlowMatchingConfig.from_args(self.args)

        def objective(batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
            return flow_matching_loss(model, vae, batch, generator, config, schedule, empty, dtype).loss

        return objective
