"""`MaskToImagePipeline`: label masks + prompt vectors -> images, with the trained MM-DiT and, optionally, CRFM.

The one place where sampling's steps are put together: encode the masks (in the checkpoint's mask encoding),
draw each item's noise from (seed, item id), integrate the flow (with CRFM's velocity hook in the first
`rectified_step` steps when a segmentor is attached and a `CRFMConfig` is passed), decode. Synthesis, the demo
(through synthesis) and the bench scripts all sample through it.

    pipe = MaskToImagePipeline.from_checkpoint("work_dirs/train/final", "sd3.5_medium", num_cls=7)
    out = pipe(labels, prompt_embeds, pooled_prompt_embeds, noise_ids=[0, 1], seed=0, num_inference_steps=23)
    pipe.segmentor = load_segmentor(config, weights, num_cls=7)
    out = pipe(labels, prompt_embeds, pooled_prompt_embeds, noise_ids=[0, 1], crfm=CRFMConfig())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crfm.models.conditioning import (
    check_mask_inputs,
    encode_mask_condition,
    mask_condition_channels,
    null_mask_condition,
    recorded_mask_encoding,
    vae_scale_factor,
)
from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.models.trained_weights import load_trained, read_checkpoint_meta
from crfm.sampling.rectify import ControlRectifier, CRFMConfig
from crfm.sampling.sampler import SolverConfig, VelocityHook, decode_latents, initial_noise, sample_latents


def negative_prompt_kwargs(vectors_path: str | Path, guidance_scale: float) -> dict[str, torch.Tensor]:
    """`MaskToImagePipeline.__call__`'s `negative_*` arguments: the empty prompt's stored vectors when
    classifier-free guidance is on (`guidance_scale > 1`), none otherwise."""
    if guidance_scale <= 1.0:
        return {}
    from crfm.data.vectors import load_empty_prompt_vectors

    empty = load_empty_prompt_vectors(vectors_path)
    return {f"negative_{key}": empty[key][None] for key in ("prompt_embeds", "pooled_prompt_embeds")}


def observed(hook: VelocityHook | None, observe: VelocityHook) -> VelocityHook:
    """`hook` (or none), then `observe` shown the velocity the solver will use."""

    def chained(index: int, sigma: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        velocity = velocity if hook is None else hook(index, sigma, latents, velocity)
        observe(index, sigma, latents, velocity)
        return velocity

    return chained


@dataclass
class MaskToImageOutput:
    images: torch.Tensor  # [B, 3, H, W] float in [-1, 1] (crfm.sampling.sampler.to_uint8 turns them into arrays)
    latents: torch.Tensor  # the final SD3-scaled latents
    crfm_trace: list[dict] = field(default_factory=list)  # one record per rectify pass (empty without CRFM)
    nfe: int = 0  # velocity evaluations per image (rk45: the mean over the batch's images)
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # grid index -> latents there (`save_at`)


class MaskToImagePipeline:
    """The mask-conditioned MM-DiT with the base pipeline's VAE and scheduler (and an optional CRFM segmentor)."""

    def __init__(
        self,
        transformer: MaskSD3Transformer2DModel,
        vae,
        scheduler,
        num_cls: int,
        segmentor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mask_encoding: str | None = None,
    ) -> None:
        """`mask_encoding`: the one `transformer` was trained with; by default what its config records (grey for a
        transformer that records none), and if given it must be that."""
        if transformer.config.get("mask_encoding") is not None:  # a config from before it was kept: channels only
            check_mask_inputs(transformer.config, "the transformer", num_cls, mask_encoding)
        mask_encoding = mask_encoding or recorded_mask_encoding(transformer.config)
        channels = mask_condition_channels(mask_encoding, num_cls, vae.config.latent_channels)
        if channels != transformer.mask_channels:
            raise ValueError(
                f"mask encoding {mask_encoding!r} gives {channels} channels; the transformer's mask branch takes "
                f"{transformer.mask_channels}"
            )
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.num_cls = num_cls
        self.segmentor = segmentor
        self.mask_encoding = mask_encoding

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        pretrained_model_name_or_path: str | Path | None = None,
        num_cls: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_tiling: bool = False,
        mask_encoding: str | None = None,
    ) -> MaskToImagePipeline:
        """A `train.py` checkpoint on its base pipeline folder (default: the base recorded in the checkpoint).

        `num_cls` and `mask_encoding`, when given, must be the checkpoint's (checked before any model is loaded);
        the masks are encoded as the checkpoint records (grey for checkpoints from before the option). The VAE
        stays fp32 (SD3's VAE is unstable in half).
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        from crfm.utils.base_folder import check_base_folder

        meta = read_checkpoint_meta(checkpoint)
        check_mask_inputs(meta, checkpoint, num_cls, mask_encoding)
        base = pretrained_model_name_or_path if pretrained_model_name_or_path is not None else meta["base_model"]
        check_base_folder(base, ("transformer", "vae", "scheduler"))
        transformer, meta = load_trained(checkpoint, pretrained=base, dtype=dtype, device=device)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=torch.float32)
        vae = vae.requires_grad_(False).eval().to(device)
        if vae_tiling:
            vae.enable_tiling()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        num_cls = num_cls if num_cls is not None else meta["num_cls"]
        return cls(transformer, vae, scheduler, num_cls)  # the encoding: the transformer's config, from the checkpoint

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @torch.no_grad()
    def encode_masks(self, labels: torch.Tensor) -> torch.Tensor:
        """Class-index maps [B, H, W] -> the mask condition (in `mask_encoding`) in the transformer's dtype."""
        condition = encode_mask_condition(self.vae, labels.to(self.device), self.num_cls, self.mask_encoding)
        return condition.to(self.device, self.dtype)

    def __call__(
        self,
        labels: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        noise_ids: Sequence[int],
        seed: int = 0,
        num_inference_steps: int = 28,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        crfm: CRFMConfig | None = None,
        progress: bool = False,
        solver: SolverConfig | None = None,
        save_at: Sequence[int] = (),
        observe: VelocityHook | None = None,
        mask_guidance_scale: float = 1.0,
    ) -> MaskToImageOutput:
        """Images for masks `labels` [B, H, W] (255 = ignore) at their resolution.

        Item `i`'s noise comes from (seed, `noise_ids[i]`), so an image does not depend on its batch. The
        negative (empty-prompt) embeddings are needed when `guidance_scale > 1`; `mask_guidance_scale > 1` guides
        away from the null mask (onehot, a model fine-tuned with mask dropout). CRFM runs when `crfm` is given,
        with `self.segmentor` as the guide, on velocities whose σ lies in the first `rectified_step` steps of the
        `num_inference_steps` grid (`crfm.sampling.sampler.grid_index`; for Euler: those steps). `solver`
        (default Euler) integrates; rk45 runs image by image, since its steps adapt to what it integrates.
        `save_at`: grid indices whose latents are returned in `states` (reflow's segment boundaries). `observe`
        sees every velocity the solver uses (after CRFM) and may not change it (e.g. `straightness.VelocityRecorder`).
        """
        if crfm is not None and self.segmentor is None:
            raise ValueError(
                "CRFM needs a segmentor: set pipe.segmentor (e.g. crfm.segmentation.adapter.load_segmentor)"
            )
        if labels.shape[-1] % self.vae_scale_factor or labels.shape[-2] % self.vae_scale_factor:
            raise ValueError(f"mask size {tuple(labels.shape[-2:])} is not a multiple of {self.vae_scale_factor}")
        solver = solver or SolverConfig()
        device, dtype = self.device, self.dtype
        labels = labels.to(device)
        masks = self.encode_masks(labels)
        null_masks = null_mask_condition(masks, self.mask_encoding) if mask_guidance_scale > 1.0 else None
        latent_hw = (labels.shape[-2] // self.vae_scale_factor, labels.shape[-1] // self.vae_scale_factor)
        # The noise has the image latents' channels; the mask condition may have others (onehot: num_cls).
        channels = self.vae.config.latent_channels
        noise = initial_noise(noise_ids, seed, (channels, *latent_hw)).to(device, dtype)

        def on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, dtype)

        conditions = [on_device(t) for t in (prompt_embeds, pooled_prompt_embeds)]
        negatives = [on_device(t) for t in (negative_prompt_embeds, negative_pooled_prompt_embeds)]
        groups = [slice(i, i + 1) for i in range(len(noise))] if solver.solver == "rk45" else [slice(None)]
        parts, trace, nfe = [], [], 0
        for rows in groups:
            hook = rectifier = None
            if crfm is not None:
                hook = rectifier = ControlRectifier(crfm, self.segmentor, self.vae, labels[rows], num_inference_steps)
            if observe is not None:
                hook = observed(rectifier, observe)
            solution = sample_latents(
                self.transformer,
                self.scheduler,
                noise[rows],
                *(t[rows] for t in conditions),
                masks[rows],
                *(t if t is None or t.shape[0] != len(noise) else t[rows] for t in negatives),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                velocity_hook=hook,
                progress=progress,
                solver=solver,
                save_at=save_at,
                mask_guidance_scale=mask_guidance_scale,
                null_mask_latents=None if null_masks is None else null_masks[rows],
            )
            parts.append(solution)
            trace += [] if rectifier is None else rectifier.trace
            nfe += solution.nfe
        latents = torch.cat([p.latents for p in parts])
        states = {i: torch.cat([p.states[i] for p in parts]) for i in parts[0].states}
        with torch.no_grad():
            images = decode_latents(self.vae, latents.float())
        return MaskToImageOutput(images, latents, trace, nfe=round(nfe / len(groups)), states=states)
