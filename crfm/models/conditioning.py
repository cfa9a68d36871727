"""Conditioning inputs in SD3's scaled latent space: images, and label masks encoded for the mask branch.

A label mask (class-index map [B, H, W], 255 = ignore) reaches the model in one of `MASK_ENCODINGS`:

- `grey`: the paper's encoding. Class id × 255/num_cls as a grey RGB image (ignore → white), VAE-encoded.
- `palette`: each class in its own colour (`class_palette(num_cls)`, ignore → black), VAE-encoded like `grey`.
  Classes differ in hue, not in faint grey steps. The colours are this encoding's, so plots of masks without a
  dataset palette (`crfm.utils.viz.colourise_mask`) are given them, not the other way round.
- `onehot`: no VAE. The per-pixel one-hot map (ignore = all-zero vector), area-averaged onto the latent grid:
  [B, num_cls, h, w] class fractions in [0, 1]. Each class has its own channel, so no two classes can be
  confused, and a latent cell on a class border says how much of each class it holds.

The VAE encodings give latents of the image latents' shape; `onehot` has num_cls channels, so the model's mask
patch embedding is built for that (`mask_condition_channels`, `MaskSD3Transformer2DModel.mask_in_channels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

# The encodings' names are defined on the ground floor, where the command-line flags read them.
from crfm.utils.constants import DEFAULT_MASK_ENCODING as DEFAULT_MASK_ENCODING
from crfm.utils.constants import IGNORE_INDEX, MASK_ENCODINGS
from crfm.utils.constants import LEGACY_MASK_ENCODING as LEGACY_MASK_ENCODING
from crfm.utils.errors import DatasetError, UsageError

# Encodings whose condition lives in the image latents' space (and so has their channel count).
VAE_MASK_ENCODINGS = ("grey", "palette")
PALETTE_IGNORE_RGB = (0, 0, 0)  # black: no colour of class_palette (HSV value 0.9) comes near it
# The "no mask" condition of mask guidance: onehot fractions lie in [0, 1], so -1 is no mask a dataset can hold
# (an all-ignore mask is all zeros, and means no-data pixels, not "anything goes").
NULL_MASK_VALUE = -1.0


def check_mask_encoding(encoding: str) -> str:
    """`encoding` itself, or a ValueError naming the known encodings."""
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"mask encoding must be one of {MASK_ENCODINGS}, got {encoding!r}")
    return encoding


def recorded_mask_encoding(record: Mapping) -> str:
    """The mask encoding a record holds (a mask transformer's config, a checkpoint's meta); records from before the
    encoding was kept are the paper's grey."""
    return check_mask_encoding(record.get("mask_encoding") or LEGACY_MASK_ENCODING)


def check_mask_inputs(
    record: Mapping, source: str | Path, num_cls: int | None = None, mask_encoding: str | None = None
) -> None:
    """The one check of what a mask branch was trained on, for training (--init_ckpt), resume and sampling: refuse
    a `record` (a model's config, a checkpoint's meta) of another `num_cls` or `mask_encoding` (None: not
    constrained). Grey and palette branches have the same shapes, so only the record tells them apart."""
    if num_cls is not None and record.get("num_cls") not in (None, num_cls):
        raise DatasetError(f"{source}: trained with num_cls={record['num_cls']}, not --num_cls {num_cls}")
    trained = recorded_mask_encoding(record)
    if mask_encoding is not None and check_mask_encoding(mask_encoding) != trained:
        raise UsageError(f"{source}: trained with --mask_encoding {trained}, not --mask_encoding {mask_encoding}")


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


def has_null_mask(encoding: str) -> bool:
    """Whether `encoding` has a "no mask" value that no real mask takes, which mask dropout and mask guidance need:
    only `onehot` (fractions in [0, 1]); the VAE encodings of grey and palette masks can take any value."""
    return check_mask_encoding(encoding) == "onehot"


def null_mask_condition(condition: torch.Tensor, encoding: str) -> torch.Tensor:
    """The "no mask" condition of the shape of `condition` (mask dropout in training, the unconditional branch of
    mask guidance); refused for an encoding without one (`has_null_mask`)."""
    if not has_null_mask(encoding):
        raise UsageError(f"mask dropout and mask guidance need --mask_encoding onehot, not {encoding!r}")
    return torch.full_like(condition, NULL_MASK_VALUE)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side (8 for SD3's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def mask_to_pixels(label: torch.Tensor, num_cls: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> grey RGB images in [-1, 1]: id * 255 / num_cls; ignore (255) -> white."""
    grey = label.float() * (255.0 / num_cls)
    grey = torch.where(label == IGNORE_INDEX, torch.full_like(grey, 255.0), grey)
    return (grey / 127.5 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1)


def class_palette(num_cls: int) -> list[tuple[int, int, int]]:
    """The `palette` encoding's colour of each class, RGB in 0..255: evenly spaced saturated hues."""
    import colorsys

    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(k / max(num_cls, 1), 0.75, 0.9)) for k in range(num_cls)]


def mask_palette(num_cls: int) -> torch.Tensor:
    """[num_cls + 1, 3] RGB in 0..255: `class_palette(num_cls)`, then the ignore colour (last row)."""
    return torch.tensor([*class_palette(num_cls), PALETTE_IGNORE_RGB], dtype=torch.float32)


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


def vae_round_trip(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] through the VAE (encode, posterior mode, decode), clamped to [-1, 1]: what
    the VAE alone keeps of them, the ceiling of every image the generator decodes."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return vae.decode(latents).sample.clamp(-1, 1)


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
    return scaled_posterior_sample(vae.encode(pixels.to(vae.dtype)).latent_dist, generator, vae.config)


def scaled_posterior_sample(posterior, generator: torch.Generator | None, vae_config) -> torch.Tensor:
    """A sample of a VAE posterior (`DiagonalGaussianDistribution`) in SD3's scaled latent space. From a fresh
    encode or from cached posterior parameters (`crfm.data.latents`), the same draw gives the same latents."""
    latents = posterior.sample(generator=generator)
    return (latents - vae_config.shift_factor) * vae_config.scaling_factor
