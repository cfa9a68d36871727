"""Conditioning inputs in SD3's scaled latent space: images, and label masks rendered for the VAE."""

from __future__ import annotations

import torch

from crfm.data.index import IGNORE_INDEX


def mask_to_pixels(label: torch.Tensor, num_cls: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> grey RGB images in [-1, 1]: id * 255 / num_cls; ignore (255) -> white."""
    grey = label.float() * (255.0 / num_cls)
    grey = torch.where(label == IGNORE_INDEX, torch.full_like(grey, 255.0), grey)
    return (grey / 127.5 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1)


def encode_mask_latents(vae, label: torch.Tensor, num_cls: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> SD3-scaled mask latents, encoded deterministically (posterior mode), as the
    condition must be the same at training and sampling time."""
    posterior = vae.encode(mask_to_pixels(label, num_cls).to(vae.device, vae.dtype)).latent_dist
    return (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor


def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE-encode images in [-1, 1] into SD3's scaled latent space (sampled from the posterior)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor
