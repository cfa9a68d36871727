"""Conditioning inputs in SD3's scaled latent space: images, and label masks encoded for the mask branch.

A label mask (class-index map [B, H, W], 255 = ignore) reaches the model in one of `MASK_ENCODINGS`:

- `grey`: the paper's encoding. Class id × 255/num_cls as a grey RGB image (ignore → white), VAE-encoded.
- `palette`: each class in its own colour (`crfm.utils.viz.distinct_palette(num_cls)`, ignore → black, as
  `colourise_mask` draws it), VAE-encoded like `grey`. Classes differ in hue, not in faint grey steps.
- `onehot`: no VAE. The per-pixel one-hot map (ignore = all-zero vector), area-averaged onto the latent grid:
  [B, num_cls, h, w] class fractions in [0, 1]. Each class has its own channel, so no two classes can be
  confused, and a latent cell on a class border says how much of each class it holds.

The VAE encodings give latents of the image latents' shape; `onehot` has num_cls channels, so the model's mask
patch embedding is built for that (`mask_condition_channels`, `MaskSD3Transformer2DModel.mask_in_channels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crfm.data.index import IGNORE_INDEX

MASK_ENCODINGS = ("grey", "palette", "onehot")
# train.py's --mask_encoding default, chosen on the demo's validation split (bench/results_fidelity.md).
DEFAULT_MASK_ENCODING = "onehot"
# Checkpoints written before the encoding was recorded used the paper's grey rendering.
LEGACY_MASK_ENCODING = "grey"
# Encodings whose condition lives in the image latents' space (and so has their channel count).
VAE_MASK_ENCODINGS = ("grey", "palette")
PALETTE_IGNORE_RGB = (0, 0, 0)  # black: no colour of distinct_palette (value 0.9) comes near it


def check_mask_encoding(encoding: str) -> str:
    """`encoding` itself, or a ValueError naming the known encodings."""
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"mask encoding must be one of {MASK_ENCODINGS}, got {encoding!r}")
    return encoding


def mask_embed_in_channels(encoding: str, num_cls: int | None) -> int | None:
    """`MaskSD3Transformer2DModel`'s `mask_in_channels` for an encoding: None for the VAE encodings (the mask is
    in the image latents' space, whose pretrained patch projection it may copy), num_cls for `onehot`."""
    if check_mask_encoding(encoding) in VAE_MASK_ENCODINGS:
        return None
    if num_cls is None:
        raise ValueError(f"the {encoding!r} mask encoding needs num_cls")
    return num_cls


def mask_condition_channels(encoding: str, num_cls: int, latent_channels: int) -> int:
    """Channels of `encode_mask_condition`'s output: the latent channels (VAE encodings) or num_cls (onehot)."""
    channels = mask_embed_in_channels(encoding, num_cls)
    return latent_channels if channels is None else channels


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side (8 for SD3's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def mask_to_pixels(label: torch.Tensor, num_cls: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> grey RGB images in [-1, 1]: id * 255 / num_cls; ignore (255) -> white."""
    grey = label.float() * (255.0 / num_cls)
    grey = torch.where(label == IGNORE_INDEX, torch.full_like(grey, 255.0), grey)
    return (grey / 127.5 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1)


def mask_palette(num_cls: int) -> torch.Tensor:
    """[num_cls + 1, 3] RGB in 0..255: `distinct_palette(num_cls)`, then the ignore colour (last row)."""
    from crfm.utils.viz import distinct_palette

    return torch.tensor([*distinct_palette(num_cls), PALETTE_IGNORE_RGB], dtype=torch.float32)


def mask_to_palette_pixels(label: torch.Tensor, num_cls: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> RGB images [B, 3, H, W] in [-1, 1], class k in `mask_palette(num_cls)[k]`,
    ignore (255) black."""
    colours = mask_palette(num_cls).to(label.device)
    index = torch.where(label == IGNORE_INDEX, torch.full_like(label, num_cls), label).long()
    return (colours[index] / 127.5 - 1.0).permute(0, 3, 1, 2)


def mask_to_class_fractions(label: torch.Tensor, num_cls: int, factor: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> [B, num_cls, H/factor, W/factor]: each cell's fraction of pixels per class.

    Ignored pixels count for no class, so a cell's fractions sum to its share of non-ignored pixels (1 without
    ignore, 0 when all ignored). Kept in [0, 1] rather than mapped to [-1, 1]: the patch projection reading them
    has a bias, so an affine rescaling would add nothing.
    """
    height, width = label.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"mask size {(height, width)} is not a multiple of the VAE factor {factor}")
    classes = torch.arange(num_cls, device=label.device).view(1, -1, 1, 1)
    onehot = (label.unsqueeze(1) == classes).float()  # the ignore id matches no class: an all-zero vector
    return F.avg_pool2d(onehot, kernel_size=factor, stride=factor)


def _vae_mode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> SD3-scaled latents of the posterior mode (deterministic)."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor


def encode_mask_latents(vae, label: torch.Tensor, num_cls: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> SD3-scaled grey mask latents, encoded deterministically (posterior mode), as
    the condition must be the same at training and sampling time. The `grey` encoding."""
    return _vae_mode_latents(vae, mask_to_pixels(label, num_cls))


def encode_mask_condition(vae, label: torch.Tensor, num_cls: int, encoding: str) -> torch.Tensor:
    """Class-index maps [B, H, W] -> the mask branch's input in `encoding` (see the module docstring), on the
    VAE's device: [B, latent channels, h, w] for grey/palette, [B, num_cls, h, w] for onehot."""
    check_mask_encoding(encoding)
    if encoding == "grey":
        return encode_mask_latents(vae, label, num_cls)
    if encoding == "palette":
        return _vae_mode_latents(vae, mask_to_palette_pixels(label, num_cls))
    return mask_to_class_fractions(label.to(vae.device), num_cls, vae_scale_factor(vae))


def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE-encode images in [-1, 1] into SD3's scaled latent space (sampled from the posterior)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor
