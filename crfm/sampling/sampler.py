"""Flow-matching Euler sampling of the mask-conditioned MM-DiT (one sampler for everything that samples).

Timesteps come from the pipeline's `FlowMatchEulerDiscreteScheduler` exactly as `StableDiffusion3Pipeline`
sets them (dynamic shift where the scheduler config asks for it); classifier-free guidance uses the stored
empty-prompt embedding. Initial noise is drawn per item from (seed, item id), so an item's image does not
depend on the batch it is sampled in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# Called after each step's velocity is computed: (step index, sigma, latents, velocity) -> velocity.
VelocityHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(
    item_ids: Sequence[int], seed: int, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[B, C, H, W] standard normal noise, item `i` drawn from its own generator seeded by (seed, i)."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)), dtype=dtype)
        for i in item_ids
    ]
    return torch.stack(rows)


def set_timesteps(scheduler, num_inference_steps: int, latent_hw: tuple[int, int], patch_size: int, device):
    """The timesteps `StableDiffusion3Pipeline` would use for latents of this size."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        seq_len = (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)
        kwargs["mu"] = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)
    return timesteps


def sample_latents(
    model,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    mask_latents: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 1.0,
    velocity_hook: VelocityHook | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the flow from noise `latents` (sigma = 1) to clean latents; returns the final latents.

    `model` is a `MaskSD3Transformer2DModel` (or diffusers' `SD3Transformer2DModel` when `mask_latents` is None).
    Guidance is on when `guidance_scale > 1`; the negative embeddings (the empty prompt) are then required.
    `velocity_hook` may rewrite each step's velocity (CRFM does); no gradient is taken through the model.
    """
    from tqdm.auto import tqdm

    guided = guidance_scale > 1.0
    if guided and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
        raise ValueError("guidance_scale > 1 needs the empty-prompt embeddings (negative_prompt_embeds)")
    patch_size = (model.transformer if hasattr(model, "transformer") else model).config.patch_size
    timesteps = set_timesteps(scheduler, num_inference_steps, latents.shape[-2:], patch_size, latents.device)
    batch = latents.shape[0]
    if guided:
        embeds = torch.cat([negative_prompt_embeds.expand_as(prompt_embeds), prompt_embeds])
        pooled = torch.cat([negative_pooled_prompt_embeds.expand_as(pooled_prompt_embeds), pooled_prompt_embeds])
        mask_in = None if mask_latents is None else torch.cat([mask_latents, mask_latents])
    else:
        embeds, pooled, mask_in = prompt_embeds, pooled_prompt_embeds, mask_latents
    extra = {} if mask_in is None else {"mask_hidden_states": mask_in}
    for index, t in enumerate(tqdm(timesteps, desc="sample", unit="step", leave=False, disable=not progress)):
        model_input = torch.cat([latents, latents]) if guided else latents
        with torch.no_grad():
            velocity = model(model_input, embeds, pooled, t.expand(model_input.shape[0]), return_dict=False, **extra)[0]
        if guided:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        if velocity_hook is not None:
            sigma = scheduler.sigmas[scheduler.step_index or index].to(latents.device)
            velocity = velocity_hook(index, sigma, latents, velocity)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    assert latents.shape[0] == batch
    return latents


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3-scaled latents -> images in [-1, 1] (float, [B, 3, H, W])."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] images [B, 3, H, W] -> list of HxWx3 uint8 arrays."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(array)
