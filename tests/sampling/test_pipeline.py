"""MaskToImagePipeline: the one sampling path (masks + prompt vectors -> images), with and without CRFM."""

from __future__ import annotations

import pytest
import torch

from crfm.data.index import DatasetError
from crfm.sampling.pipeline import MaskToImagePipeline
from crfm.sampling.rectify import CRFMConfig
from crfm.utils.flags import UsageError
from tests.helpers import NUM_CLS, ColourSegmentor, perturb_trainable


@pytest.fixture(scope="module")
def pipe(trained_checkpoint, tiny_sd35_dir) -> MaskToImagePipeline:
    return MaskToImagePipeline.from_checkpoint(trained_checkpoint, tiny_sd35_dir, num_cls=NUM_CLS)


def inputs(pipe: MaskToImagePipeline, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLS, (batch, 64, 64), generator=gen)
    labels[:, :8] = 255  # an ignored band, as no-data borders
    width = pipe.transformer.transformer.config.joint_attention_dim
    pooled = pipe.transformer.transformer.config.pooled_projection_dim
    return labels, torch.randn(batch, 12, width, generator=gen), torch.randn(batch, pooled, generator=gen)


def test_from_checkpoint_rebuilds_the_trained_model_and_checks_classes(pipe, trained_checkpoint, tiny_sd35_dir):
    assert pipe.num_cls == NUM_CLS and pipe.vae_scale_factor == 8 and pipe.vae.dtype == torch.float32
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    with pytest.raises(DatasetError, match="trained with num_cls=6"):
        MaskToImagePipeline.from_checkpoint(trained_checkpoint, tiny_sd35_dir, num_cls=7)


def test_images_follow_the_mask_size_and_do_not_depend_on_the_batch(pipe):
    labels, embeds, pooled = inputs(pipe, 3)
    together = pipe(labels, embeds, pooled, noise_ids=[5, 6, 7], seed=1, num_inference_steps=3)
    assert together.images.shape == (3, 3, 64, 64) and together.crfm_trace == []
    assert together.images.min() >= -1 and together.images.max() <= 1
    alone = pipe(labels[1:2], embeds[1:2], pooled[1:2], noise_ids=[6], seed=1, num_inference_steps=3)
    torch.testing.assert_close(alone.latents, together.latents[1:2], rtol=1e-4, atol=1e-5)
    other_seed = pipe(labels[1:2], embeds[1:2], pooled[1:2], noise_ids=[6], seed=2, num_inference_steps=3)
    assert not torch.allclose(other_seed.latents, alone.latents)


def test_the_mask_changes_the_image(pipe):
    labels, embeds, pooled = inputs(pipe, 1)
    first = pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=3)
    second = pipe((labels + 1) % NUM_CLS, embeds, pooled, noise_ids=[0], num_inference_steps=3)
    assert (first.latents - second.latents).abs().max() > 1e-3


def test_guidance_needs_and_uses_the_negative_prompt(pipe):
    labels, embeds, pooled = inputs(pipe, 1)
    with pytest.raises(ValueError, match="empty-prompt"):
        pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=2, guidance_scale=3.0)
    negative = {"negative_prompt_embeds": torch.zeros_like(embeds), "negative_pooled_prompt_embeds": pooled * 0}
    plain = pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=2)
    guided = pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=2, guidance_scale=3.0, **negative)
    assert (plain.latents - guided.latents).abs().max() > 1e-4


def test_crfm_rectifies_the_first_steps_and_needs_a_segmentor(pipe):
    labels, embeds, pooled = inputs(pipe, 2)
    config = CRFMConfig.paper(rectified_step=2, num_rectified=2, max_step_size=0.5)
    with pytest.raises(ValueError, match="needs a segmentor"):
        pipe(labels, embeds, pooled, noise_ids=[0, 1], num_inference_steps=4, crfm=config)
    plain = pipe(labels, embeds, pooled, noise_ids=[0, 1], num_inference_steps=4)
    pipe.segmentor = ColourSegmentor()
    try:
        guided = pipe(labels, embeds, pooled, noise_ids=[0, 1], num_inference_steps=4, crfm=config)
    finally:
        pipe.segmentor = None
    assert [(t["step"], t["pass"]) for t in guided.crfm_trace] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(t["loss"]) == 2 for t in guided.crfm_trace)  # one loss per image
    assert (plain.latents - guided.latents).abs().max() > 1e-4


def test_masks_must_fit_the_vae_grid(pipe):
    labels, embeds, pooled = inputs(pipe, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(labels[:, :60, :60], embeds, pooled, noise_ids=[0], num_inference_steps=2)


@pytest.fixture(scope="module")
def onehot_checkpoint(tiny_sd35_dir, tmp_path_factory):
    from crfm.models.mmdit import MaskSD3Transformer2DModel
    from crfm.models.trained_weights import configure_training, save_trained

    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=NUM_CLS)
    configure_training(model, "full")
    perturb_trainable(model, seed=0, scale=0.01)
    meta = {"train_mode": "full", "num_cls": NUM_CLS, "base_model": str(tiny_sd35_dir), "mask_encoding": "onehot"}
    return save_trained(model, tmp_path_factory.mktemp("onehot") / "ckpt", meta)


def test_the_checkpoints_mask_encoding_is_used(pipe, onehot_checkpoint, tiny_sd35_dir):
    assert pipe.mask_encoding == "grey"  # a checkpoint from before the option
    onehot = MaskToImagePipeline.from_checkpoint(onehot_checkpoint, tiny_sd35_dir)
    assert onehot.mask_encoding == "onehot" and onehot.transformer.mask_channels == NUM_CLS
    labels, embeds, pooled = inputs(onehot, 1)
    assert onehot.encode_masks(labels).shape == (1, NUM_CLS, 8, 8)
    first = onehot(labels, embeds, pooled, noise_ids=[0], num_inference_steps=3)
    second = onehot((labels + 1) % NUM_CLS, embeds, pooled, noise_ids=[0], num_inference_steps=3)
    assert first.images.shape == (1, 3, 64, 64)
    assert (first.latents - second.latents).abs().max() > 1e-3


@pytest.mark.parametrize(("asked", "trained"), [("onehot", "grey"), ("grey", "onehot"), ("palette", "grey")])
def test_another_mask_encoding_is_refused_naming_both(
    trained_checkpoint, onehot_checkpoint, tiny_sd35_dir, asked, trained
):
    checkpoint = onehot_checkpoint if trained == "onehot" else trained_checkpoint
    with pytest.raises(UsageError) as refused:
        MaskToImagePipeline.from_checkpoint(checkpoint, tiny_sd35_dir, mask_encoding=asked)
    message = str(refused.value)
    assert "\n" not in message
    assert f"trained with --mask_encoding {trained}, not --mask_encoding {asked}" in message
    with pytest.raises(ValueError, match="mask encoding must be one of"):
        MaskToImagePipeline.from_checkpoint(checkpoint, tiny_sd35_dir, mask_encoding="rgb")


def test_an_encoding_that_does_not_fit_the_transformer_is_refused(pipe, tiny_sd35_dir):
    # The transformer's config records what it was trained on (from its checkpoint): the one check refuses.
    with pytest.raises(UsageError, match="trained with --mask_encoding grey, not --mask_encoding onehot"):
        MaskToImagePipeline(pipe.transformer, pipe.vae, pipe.scheduler, NUM_CLS, mask_encoding="onehot")
    # A transformer configured without the record: its channels alone say it.
    from crfm.models.mmdit import MaskSD3Transformer2DModel

    unrecorded = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    with pytest.raises(ValueError, match="'onehot' gives 6 channels; the transformer's mask branch takes 16"):
        MaskToImagePipeline(unrecorded, pipe.vae, pipe.scheduler, NUM_CLS, mask_encoding="onehot")


def test_mask_guidance_needs_onehot_masks_and_changes_the_image(pipe, tiny_sd35_dir):
    from crfm.models.mmdit import MaskSD3Transformer2DModel

    labels, embeds, pooled = inputs(pipe, 1)
    with pytest.raises(UsageError, match="onehot"):  # the fixture's checkpoint is grey: no null mask exists
        pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=2, mask_guidance_scale=2.0)
    onehot = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_encoding="onehot", num_cls=NUM_CLS)
    perturb_trainable(onehot, seed=1, scale=0.05)
    onehot_pipe = MaskToImagePipeline(onehot.eval(), pipe.vae, pipe.scheduler, NUM_CLS)
    plain = onehot_pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=2)
    guided = onehot_pipe(labels, embeds, pooled, noise_ids=[0], num_inference_steps=2, mask_guidance_scale=2.0)
    assert guided.nfe == plain.nfe == 2
    assert (plain.latents - guided.latents).abs().max() > 1e-4
