"""crfm.models.conditioning: the three mask encodings (grey, palette, onehot), checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from crfm.data.index import IGNORE_INDEX
from crfm.models.conditioning import (
    DEFAULT_MASK_ENCODING,
    MASK_ENCODINGS,
    class_palette,
    encode_latents,
    encode_mask_condition,
    encode_mask_latents,
    mask_condition_channels,
    mask_embed_in_channels,
    mask_to_class_fractions,
    mask_to_palette_pixels,
)
from tests.helpers import NUM_CLS

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def vae(tiny_sd35_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd35_dir, subfolder="vae").requires_grad_(False).eval()


def labels(batch: int = 2, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Random classes, an ignored top band (whole latent rows) and one ignored pixel."""
    label = torch.randint(0, NUM_CLS, (batch, side, side), generator=torch.Generator().manual_seed(seed))
    label[:, :8] = IGNORE_INDEX
    label[:, 20, 3] = IGNORE_INDEX
    return label


def test_names_and_channels():
    assert MASK_ENCODINGS == ("grey", "palette", "onehot") and DEFAULT_MASK_ENCODING in MASK_ENCODINGS
    assert [mask_condition_channels(e, 6, 16) for e in MASK_ENCODINGS] == [16, 16, 6]
    assert [mask_embed_in_channels(e, 6) for e in MASK_ENCODINGS] == [None, None, 6]
    with pytest.raises(ValueError, match="mask encoding must be one of"):
        mask_condition_channels("rgb", 6, 16)


def test_grey_is_the_papers_rendering_through_the_vae_posterior_mode(vae):
    label = labels()
    with torch.no_grad():
        got = encode_mask_condition(vae, label, NUM_CLS, "grey")
        # By hand: id * 255 / num_cls, ignore white, to [-1, 1], three equal channels, posterior mode, SD3 scaling.
        value = torch.where(label == IGNORE_INDEX, 255.0, label.float() * (255.0 / NUM_CLS))
        pixels = (value / 127.5 - 1.0)[:, None].expand(-1, 3, -1, -1)
        mode = vae.encode(pixels).latent_dist.mode()
        expected = (mode - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.equal(got, expected)
    assert torch.equal(got, encode_mask_latents(vae, label, NUM_CLS))


@pytest.mark.parametrize("num_cls", [NUM_CLS, 20])
def test_palette_gives_each_class_its_own_colour(num_cls):
    label = torch.cat([torch.arange(num_cls), torch.tensor([IGNORE_INDEX])]).view(1, 1, -1)
    pixels = mask_to_palette_pixels(label, num_cls)
    assert pixels.shape == (1, 3, 1, num_cls + 1) and pixels.min() >= -1 and pixels.max() <= 1
    rgb = ((pixels[0, :, 0].T + 1) * 127.5).round().long().tolist()
    assert [tuple(c) for c in rgb[:num_cls]] == class_palette(num_cls)
    assert rgb[num_cls] == [0, 0, 0]  # ignore is black
    assert len({tuple(c) for c in rgb}) == num_cls + 1  # every class and ignore differ


def test_palette_colours_are_pinned():
    """The palette encoding's colours are part of what a palette checkpoint was trained on: they never change."""
    assert class_palette(6) == [
        (230, 57, 57),
        (230, 230, 57),
        (57, 230, 57),
        (57, 230, 230),
        (57, 57, 230),
        (230, 57, 230),
    ]


def test_palette_latents_have_the_image_latent_shape(vae):
    label = labels()
    with torch.no_grad():
        got = encode_mask_condition(vae, label, NUM_CLS, "palette")
        image_latents = encode_latents(vae, torch.zeros(2, 3, 32, 32))
        expected = vae.encode(mask_to_palette_pixels(label, NUM_CLS)).latent_dist.mode()
    assert got.shape == image_latents.shape == (2, vae.config.latent_channels, 4, 4)
    assert torch.equal(got, (expected - vae.config.shift_factor) * vae.config.scaling_factor)
    assert not torch.allclose(got, encode_mask_latents(vae, label, NUM_CLS))


def test_onehot_is_the_area_average_of_the_one_hot_map():
    # 4x4 pixels, 3 classes, factor 2 -> 2x2 cells, averaged by hand.
    label = torch.tensor([[[0, 0, 1, 2], [0, 1, 255, 255], [2, 2, 255, 255], [2, 2, 255, 255]]])
    got = mask_to_class_fractions(label, 3, 2)
    expected = torch.tensor(
        [
            [[0.75, 0.0], [0.0, 0.0]],  # class 0 per cell
            [[0.25, 0.25], [0.0, 0.0]],  # class 1
            [[0.0, 0.25], [1.0, 0.0]],  # class 2
        ]
    )
    assert got.shape == (1, 3, 2, 2) and got.dtype == torch.float32
    assert torch.equal(got[0], expected)
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 2"):
        mask_to_class_fractions(label[:, :3], 3, 2)


def test_onehot_needs_no_vae_and_gives_class_fractions_per_latent_cell(vae):
    label = labels()
    got = encode_mask_condition(vae, label, NUM_CLS, "onehot")
    assert got.shape == (2, NUM_CLS, 4, 4)  # 32 px / VAE factor 8
    onehot = torch.stack([(label == k).float() for k in range(NUM_CLS)], dim=1)
    assert torch.equal(got, onehot.view(2, NUM_CLS, 4, 8, 4, 8).mean(dim=(3, 5)))
    total = got.sum(dim=1)
    ignored = (label == IGNORE_INDEX).float().view(2, 4, 8, 4, 8).mean(dim=(2, 4))
    assert torch.allclose(total[ignored == 0], torch.tensor(1.0))  # no ignore: the fractions sum to 1
    assert torch.equal(total[ignored == 1], torch.zeros(int((ignored == 1).sum())))  # fully ignored: all zero
    partial = (ignored > 0) & (ignored < 1)
    assert partial.any() and torch.allclose(total[partial], 1 - ignored[partial])
