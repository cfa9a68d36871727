"""CRFM: the loss it differentiates, its step sizes, the direction of its update, and its use in sampling."""

from __future__ import annotations

import math

import pytest
import torch

from crfm.sampling.rectify import ControlRectifier, CRFMConfig, misclassified_cross_entropy, step_size
from crfm.sampling.sampler import decode_latents
from tests.helpers import ColourSegmentor

NUM_CLS = 6


@pytest.fixture(scope="module")
def vae(tiny_sd35_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd35_dir / "vae").eval().requires_grad_(False)


def labels_for(batch: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    labels = torch.randint(0, NUM_CLS, (batch, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky, like land-cover masks
    labels[:, :4, :] = 255  # an ignored strip
    return labels


def segmentor_loss(vae, segmentor, latents, sigma, velocity, labels) -> torch.Tensor:
    with torch.no_grad():
        return misclassified_cross_entropy(segmentor(decode_latents(vae, latents - sigma * velocity)), labels)


def test_loss_counts_only_valid_misclassified_pixels():
    labels = torch.tensor([[[0, 1], [255, 2]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = 5.0  # pixel (0,0): class 0, correct -> not counted
    logits[0, 0, 0, 1] = 5.0  # pixel (0,1): predicts 0, label 1 -> counted
    logits[0, 0, 1, 1] = 5.0  # pixel (1,1): predicts 0, label 2 -> counted; (1,0) ignored
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    expected = (per_pixel[0, 0, 1] + per_pixel[0, 1, 1]) / 2
    assert torch.allclose(misclassified_cross_entropy(logits, labels), expected[None])
    perfect = torch.zeros(1, 3, 2, 2)
    perfect[0, 0, 0, 0] = perfect[0, 1, 0, 1] = perfect[0, 2, 1, 1] = 5.0
    assert misclassified_cross_entropy(perfect, labels).item() == 0.0


def test_step_size_schedules():
    n = 23
    assert step_size(CRFMConfig.paper(step_scheme="LD", max_step_size=0.1), 0, n) == pytest.approx(0.1 * (1 - 1 / n))
    assert step_size(CRFMConfig.paper(step_scheme="LD", max_step_size=0.1), 3, n) == pytest.approx(0.1 * (1 - 4 / n))
    assert step_size(CRFMConfig.paper(step_scheme="LI", max_step_size=0.1), 3, n) == pytest.approx(0.1 * 4 / n)
    assert step_size(CRFMConfig.paper(step_scheme="C", max_step_size=0.2), 7, n) == 0.2
    paper = CRFMConfig.paper()  # the paper's scripts
    assert (paper.rectified_step, paper.max_step_size, paper.step_scheme) == (4, 0.1, "LD")
    assert (paper.num_rectified, paper.l2_norm, paper.shrink_velocity, paper.velocity_clamp) == (1, False, False, 1.0)
    # test.py's defaults: chosen on the demo's validation split (bench/results_crfm_settings.md).
    defaults = CRFMConfig()
    assert (defaults.rectified_step, defaults.max_step_size, defaults.num_rectified) == (12, 30.0, 3)
    assert (defaults.l2_norm, defaults.velocity_clamp, defaults.step_scheme) == (True, 0.0, "LD")
    assert CRFMConfig.paper(num_rectified=2).num_rectified == 2
    with pytest.raises(ValueError, match="step_scheme"):
        CRFMConfig(step_scheme="X")


@pytest.mark.parametrize("l2_norm", [False, True])
def test_update_descends_the_segmentor_loss(vae, l2_norm):
    segmentor, labels = ColourSegmentor(), labels_for(2)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=gen)
    velocity = 0.2 * torch.randn(2, 16, 8, 8, generator=gen)  # inside [-1, 1]: the clamp is not what helps
    sigma = torch.tensor(0.8)
    config = CRFMConfig.paper(max_step_size=0.02 if l2_norm else 0.5, step_scheme="C", l2_norm=l2_norm)
    rectifier = ControlRectifier(config, segmentor, vae, labels, num_inference_steps=10)
    new_velocity = rectifier(0, sigma, latents, velocity)
    before = segmentor_loss(vae, segmentor, latents, sigma, velocity, labels)
    after = segmentor_loss(vae, segmentor, latents, sigma, new_velocity, labels)
    assert (after < before).all(), (before, after)
    assert torch.allclose(torch.tensor(rectifier.trace[0]["loss"]), before, atol=1e-5)  # the traced loss is v's
    if l2_norm:  # a normalised step moves each sample by exactly eta (nothing was clamped)
        moved = (velocity - new_velocity).flatten(1).norm(dim=1)
        assert torch.allclose(moved, torch.full((2,), 0.02), atol=1e-5)


def test_only_the_first_steps_are_rectified_and_values_are_clamped(vae):
    rectifier = ControlRectifier(
        CRFMConfig.paper(rectified_step=2, max_step_size=50.0, step_scheme="C"),
        ColourSegmentor(),
        vae,
        labels_for(1),
        10,
    )
    latents, velocity, sigma = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.tensor(0.5)
    assert torch.equal(rectifier(2, sigma, latents, velocity), velocity)
    assert torch.equal(rectifier(5, sigma, latents, velocity), velocity)
    rectified = rectifier(1, sigma, latents, velocity)
    assert not torch.equal(rectified, velocity)
    assert rectified.abs().max() <= 1.0 and (rectified.abs() == 1.0).any()  # a huge step is clamped to [-1, 1]
    shrunk = ControlRectifier(
        CRFMConfig.paper(max_step_size=0.5, step_scheme="C", shrink_velocity=True),
        ColourSegmentor(),
        vae,
        labels_for(1),
        10,
    )
    plain = ControlRectifier(
        CRFMConfig.paper(max_step_size=0.5, step_scheme="C"), ColourSegmentor(), vae, labels_for(1), 10
    )
    small = 0.1 * velocity
    gradient_step = small - plain(0, sigma, latents, small)  # eta * g
    assert torch.allclose(shrunk(0, sigma, latents, small), (0.5 * small - gradient_step).clamp(-1, 1), atol=1e-6)


def test_items_are_rectified_independently_of_their_batch(vae):
    segmentor, labels = ColourSegmentor(), labels_for(3)
    latents, velocity = torch.randn(3, 16, 8, 8), 0.3 * torch.randn(3, 16, 8, 8)
    sigma = torch.tensor(0.7)
    config = CRFMConfig.paper(max_step_size=0.3, num_rectified=2)
    together = ControlRectifier(CRFMConfig.paper(**{**config.__dict__, "chunk_size": 3}), segmentor, vae, labels, 10)(
        0, sigma, latents, velocity
    )
    alone = torch.cat(
        [
            ControlRectifier(config, segmentor, vae, labels[i : i + 1], 10)(
                0, sigma, latents[i : i + 1], velocity[i : i + 1]
            )
            for i in range(3)
        ]
    )
    assert torch.allclose(together, alone, atol=1e-5)


class PositionBiasedSegmentor(ColourSegmentor):
    """ColourSegmentor plus a fixed logit map over the pixels: beliefs bound to one orientation."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        ramp = torch.linspace(-4.0, 4.0, size).expand(size, size)
        return super().forward(images) + torch.stack([ramp * (c - 2.5) for c in range(NUM_CLS)])


def test_views_ask_the_guide_about_each_orientation_in_turn(vae):
    """--crfm_views: a guide that treats every pixel alike gives the same rectified velocity in every view; one with
    orientation-bound beliefs does not. Only a non-default count enters test.py's record (older records resume)."""
    labels = labels_for(2)
    latents, velocity = torch.randn(2, 16, 8, 8), 0.3 * torch.randn(2, 16, 8, 8)
    sigma = torch.tensor(0.7)
    config = CRFMConfig(rectified_step=2, max_step_size=0.5, num_rectified=2)
    for segmentor, alike in ((ColourSegmentor(), True), (PositionBiasedSegmentor(), False)):
        results = [
            ControlRectifier(CRFMConfig(**{**config.__dict__, "views": views}), segmentor, vae, labels, 10)(
                1, sigma, latents, velocity
            )
            for views in (1, 8)
        ]
        assert torch.allclose(*results, atol=1e-4) == alike
    assert "views" not in CRFMConfig(views=1).record() and CRFMConfig().record()["views"] == 8
    assert CRFMConfig(views=4).flags() == ["--crfm_views", "4"] and CRFMConfig.paper().views == 1
    with pytest.raises(ValueError, match="views"):
        CRFMConfig(views=3)


def test_works_under_no_grad_and_touches_no_weights(vae):
    segmentor = ColourSegmentor()
    segmentor.head.weight.requires_grad_(True)  # even a segmentor that forgot to freeze keeps its weights clean
    rectifier = ControlRectifier(CRFMConfig.paper(checkpoint_decode=True), segmentor, vae, labels_for(1), 10)
    latents, velocity = torch.randn(1, 16, 8, 8), 0.3 * torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        rectified = rectifier(0, torch.tensor(0.9), latents, velocity)
    assert not torch.equal(rectified, velocity)
    assert segmentor.head.weight.grad is None
    assert all(p.grad is None for p in vae.parameters())


def test_crfm_in_sampling_lowers_the_segmentor_loss_of_the_result(tiny_sd35_dir, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from crfm.models.mmdit import MaskSD3Transformer2DModel
    from crfm.sampling.sampler import initial_noise, sample_latents

    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    segmentor, labels = ColourSegmentor(), labels_for(2)
    cfg = model.transformer.config
    embeds = torch.randn(2, 77 + 16, cfg.joint_attention_dim, generator=torch.Generator().manual_seed(3))
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=torch.Generator().manual_seed(4))
    masks = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    steps = 8

    def run(hook):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd35_dir, subfolder="scheduler")
        noise = initial_noise([0, 1], seed=0, shape=(16, 8, 8))
        return sample_latents(
            model, scheduler, noise, embeds, pooled, masks, num_inference_steps=steps, velocity_hook=hook
        ).latents

    def final_loss(latents):
        with torch.no_grad():
            return misclassified_cross_entropy(segmentor(decode_latents(vae, latents)), labels)

    plain = run(None)
    rectifier = ControlRectifier(
        CRFMConfig.paper(rectified_step=steps, max_step_size=0.5, step_scheme="C", l2_norm=True),
        segmentor,
        vae,
        labels,
        steps,
    )
    rectified = run(rectifier)
    assert len(rectifier.trace) == steps and all(math.isfinite(x) for t in rectifier.trace for x in t["loss"])
    assert (final_loss(rectified) < final_loss(plain)).all(), (final_loss(plain), final_loss(rectified))


def test_velocity_clamp_is_configurable(vae):
    """The paper's clamp is c = 1; c = 2 clamps there instead; c = 0 leaves the rectified velocity as it is."""
    latents, velocity, sigma = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.tensor(0.5)

    def rectify(clamp: float) -> torch.Tensor:
        config = CRFMConfig.paper(rectified_step=1, max_step_size=50.0, step_scheme="C", velocity_clamp=clamp)
        return ControlRectifier(config, ColourSegmentor(), vae, labels_for(1), 10)(0, sigma, latents, velocity)

    unclamped = rectify(0.0)
    assert unclamped.abs().max() > 2.0  # the huge step shows
    torch.testing.assert_close(rectify(2.0), unclamped.clamp(-2, 2))
    torch.testing.assert_close(rectify(1.0), unclamped.clamp(-1, 1))
    with pytest.raises(ValueError, match="velocity_clamp"):
        CRFMConfig(velocity_clamp=-1.0)


def test_flags_select_the_setting_they_were_made_from():
    import argparse

    parser = argparse.ArgumentParser()
    CRFMConfig.add_flags(parser)
    paper = CRFMConfig.paper()
    assert "--no-l2_norm" in paper.flags() and CRFMConfig().flags() == []
    assert CRFMConfig.from_args(parser.parse_args(paper.flags())) == paper


def test_shrink_velocity_keeps_its_first_name_as_flag_and_in_records():
    import argparse

    parser = argparse.ArgumentParser()
    CRFMConfig.add_flags(parser)
    for spelling in ("--shrink_velocity", "--is_synth"):
        assert CRFMConfig.from_args(parser.parse_args([spelling])).shrink_velocity
    assert not CRFMConfig.from_args(parser.parse_args(["--is_synth", "--no-is_synth"])).shrink_velocity
    record = CRFMConfig(shrink_velocity=True).record()
    assert record["is_synth"] is True and "shrink_velocity" not in record  # reflow_pairs.json's key, unchanged
