"""Control-rectify flow matching (CRFM): a frozen segmentor corrects the velocity in the first sampling steps.

At step i < `rectified_step` the sampler's velocity v is rectified: the clean latent is predicted as
x̂₀ = x_t − σ_t·v, decoded by the VAE, and a frozen segmentor's cross-entropy against the conditioning mask —
counted only on pixels that are valid (not 255) and currently misclassified, averaged per image — is
differentiated with respect to v. Then v ← (1−η)·v − η·g (the (1−η) shrink only with `shrink_velocity`), optionally
with g L2-normalised per sample, and v is clamped to [−c, c] (c = `velocity_clamp`, 1 in the paper's scripts; 0
turns the clamp off); this repeats `num_rectified` times, the segmentor seeing the decoded image in one of `views`
dihedral views per pass in turn (its prediction turned back onto the mask). η follows
`step_scheme`: LD η_max·(1−(i+1)/N), LI η_max·(i+1)/N, C η_max, with N the number of sampling steps.

Each image's loss is its own (summed over the batch, not averaged), so an item's correction does not depend
on the batch it is sampled in. The segmentor is any module mapping images in [-1, 1] to per-class logits at
the image's resolution (e.g. `crfm.segmentation.adapter.SegmentorAdapter`); no gradient reaches any model's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from crfm.segmentation.views import VIEW_COUNTS, dihedral_views, predict_in_view
from crfm.utils.constants import IGNORE_INDEX
from crfm.utils.flags import (
    UsageError,
    add_settings_flags,
    bounded,
    option,
    positive_int,
    settings_flags,
    settings_from_args,
)

STEP_SCHEMES = ("LD", "LI", "C")
# reflow_pairs.json records a CRFM teacher's settings; the shrink was recorded under its first name, so pair folders
# made before the rename still resume.
RECORDED_NAMES = {"shrink_velocity": "is_synth"}
# Fields added since records were first written: left out of a record at the value every earlier record was made
# with, so work dirs made before still resume.
ADDED_FIELDS = {"views": 1}


@dataclass
class CRFMConfig:
    """CRFM's settings; `add_flags` makes them command-line flags and `from_args` builds them back."""

    # Defaults chosen on the demo's validation split (bench/results_crfm_settings.md); the paper's scripts'
    # setting is `CRFMConfig.paper()`.
    rectified_step: int = option(
        12, "CRFM corrects the first N sampling steps (the paper's scripts: 4 of 23)", kind=bounded(int, 0)
    )
    max_step_size: float = option(
        30.0, "eta_max of the CRFM step-size scheme (the paper's scripts: 0.1)", kind=bounded(float, 0.0)
    )
    step_scheme: str = option("LD", "eta schedule: linear decreasing, increasing, constant", choices=STEP_SCHEMES)
    num_rectified: int = option(3, "CRFM passes per rectified step (the paper's scripts: 1)", kind=positive_int)
    l2_norm: bool = option(True, "L2-normalise the CRFM gradient per image (the paper's scripts: no)")
    # The original scripts' name for it (`is_synth`) stays as the flag's alias.
    shrink_velocity: bool = option(False, "also shrink the velocity by (1 - eta)", aliases=("is_synth",))
    chunk_size: int = option(
        1, "images per CRFM backward pass (bounds memory)", flag="crfm_chunk_size", kind=positive_int
    )
    checkpoint_decode: bool = option(False, "recompute the VAE decoder in CRFM's backward pass (less memory)")
    # The guide's beliefs bound to one orientation are what a long CRFM push exploits (bench/results_crfm_gap.md):
    # cycling its view over the passes asks for what every view agrees on, at no extra cost.
    views: int = option(
        8, "dihedral views the guide sees, one per CRFM pass in turn (1: the image as is, as the paper's scripts)",
        flag="crfm_views", kind=int, choices=VIEW_COUNTS,
    )  # fmt: skip
    # SD3-scaled velocities (noise - x0) have a std of ~1.4, so the paper scripts' clamp to [-1, 1] also clips many
    # components CRFM never touched.
    velocity_clamp: float = option(
        0.0, "clamp rectified velocities to [-c, c] (the paper's scripts: 1; 0: off)", kind=bounded(float, 0.0)
    )

    def __post_init__(self) -> None:
        if self.views not in VIEW_COUNTS:
            raise ValueError(f"views must be one of {VIEW_COUNTS}, got {self.views}")
        if self.step_scheme not in STEP_SCHEMES:
            raise ValueError(f"step_scheme must be one of {STEP_SCHEMES}, got {self.step_scheme!r}")
        if self.rectified_step < 0 or self.num_rectified < 1 or self.chunk_size < 1 or self.velocity_clamp < 0:
            raise ValueError(
                "rectified_step >= 0, num_rectified >= 1, chunk_size >= 1 and velocity_clamp >= 0 are required"
            )

    @classmethod
    def paper(cls, **overrides: object) -> CRFMConfig:
        """The setting of the paper's scripts (4 of 23 steps, eta_max 0.1, one raw pass, clamp 1, the image as is),
        with overrides."""
        settings = dict(
            rectified_step=4, max_step_size=0.1, num_rectified=1, l2_norm=False, velocity_clamp=1.0, views=1
        )
        return cls(**{**settings, **overrides})

    def flags(self) -> list[str]:
        """test.py's flags that select this setting: those of the fields that differ from the defaults."""
        return settings_flags(self)

    def record(self) -> dict:
        """The settings as test.py's and reflow_pairs.json's records keep them (`RECORDED_NAMES`, `ADDED_FIELDS`)."""
        return {
            RECORDED_NAMES.get(key, key): value
            for key, value in dataclasses.asdict(self).items()
            if key not in ADDED_FIELDS or value != ADDED_FIELDS[key]
        }

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        add_settings_flags(cls, parser.add_argument_group("CRFM (on when a segmentor is given)"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CRFMConfig:
        return settings_from_args(cls, args)


def check_guide_flags(args: argparse.Namespace) -> None:
    """The guide segmentor's two flags come together (before anything is read or loaded)."""
    if (args.mmseg_config is None) != (args.mmseg_ckpt is None):
        raise UsageError("--mmseg_config, --mmseg_ckpt: CRFM needs both")


def attach_guide(pipe, args: argparse.Namespace, device: str | torch.device) -> CRFMConfig | None:
    """The one loader of the CRFM guide: with --mmseg_config/--mmseg_ckpt, the frozen segmentor goes on `pipe`
    (`MaskToImagePipeline.segmentor`) and CRFM's settings come from the flags; without them, None (no CRFM)."""
    check_guide_flags(args)
    if args.mmseg_config is None:
        return None
    from crfm.segmentation.adapter import load_segmentor

    pipe.segmentor = load_segmentor(args.mmseg_config, args.mmseg_ckpt, device=device, num_cls=args.num_cls)
    return CRFMConfig.from_args(args)


def step_size(config: CRFMConfig, index: int, num_inference_steps: int) -> float:
    """η at sampling step `index` (0-based)."""
    fraction = (index + 1) / num_inference_steps
    if config.step_scheme == "LD":
        return config.max_step_size * (1.0 - fraction)
    if config.step_scheme == "LI":
        return config.max_step_size * fraction
    return config.max_step_size


def misclassified_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image mean cross-entropy over valid, currently misclassified pixels ([B]); 0 where none are."""
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = ((labels != IGNORE_INDEX) & (logits.argmax(dim=1) != labels)).float()
    return (per_pixel * counted).sum(dim=(1, 2)) / counted.sum(dim=(1, 2)).clamp_min(1.0)


@dataclass
class ControlRectifier:
    """A `crfm.sampling.sampler.VelocityHook` that applies CRFM; `trace` collects the loss of every rectify pass."""

    config: CRFMConfig
    segmentor: Callable[[torch.Tensor], torch.Tensor]
    vae: torch.nn.Module
    labels: torch.Tensor  # [B, H, W] class ids at the decoded image's resolution (255 = ignore)
    num_inference_steps: int
    trace: list[dict] = field(default_factory=list)

    def _loss(
        self, latents: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor, rows: slice,
        view: tuple[int, bool] = (0, False),
    ) -> torch.Tensor:  # fmt: skip
        from crfm.sampling.sampler import decode_latents

        clean = latents[rows] - sigma * velocity
        if self.config.checkpoint_decode:
            images = torch.utils.checkpoint.checkpoint(decode_latents, self.vae, clean, use_reentrant=False)
        else:
            images = decode_latents(self.vae, clean)
        logits = predict_in_view(self.segmentor, images, *view)
        if logits.shape[-2:] != self.labels.shape[-2:]:
            raise ValueError(
                f"segmentor logits {tuple(logits.shape)} do not match the masks {tuple(self.labels.shape)}"
            )
        return misclassified_cross_entropy(logits, self.labels[rows].to(logits.device))

    def __call__(self, index: int, sigma: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        if index >= self.config.rectified_step:
            return velocity
        eta = step_size(self.config, index, self.num_inference_steps)
        velocity = velocity.detach()
        views = dihedral_views(self.config.views)
        for rectify_pass in range(self.config.num_rectified):
            view = views[(index * self.config.num_rectified + rectify_pass) % len(views)]  # each in turn
            gradient = torch.zeros_like(velocity)
            losses = []
            # enable_grad: CRFM must work even when the caller samples under torch.no_grad().
            with torch.enable_grad():
                for start in range(0, velocity.shape[0], self.config.chunk_size):
                    rows = slice(start, start + self.config.chunk_size)
                    chunk = velocity[rows].clone().requires_grad_(True)
                    loss = self._loss(latents, sigma, chunk, rows, view)
                    (grad,) = torch.autograd.grad(loss.sum(), chunk)
                    gradient[rows] = grad
                    losses.extend(loss.detach().cpu().tolist())
            if self.config.l2_norm:
                norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
                gradient = gradient / norms.view(-1, *([1] * (gradient.dim() - 1)))
            if self.config.shrink_velocity:
                velocity = (1.0 - eta) * velocity
            velocity = velocity - eta * gradient
            if self.config.velocity_clamp > 0:
                velocity = velocity.clamp(-self.config.velocity_clamp, self.config.velocity_clamp)
            self.trace.append({"step": index, "pass": rectify_pass, "eta": eta, "loss": losses})
        return velocity
