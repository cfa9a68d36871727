"""The sampler against its peer, diffusers' StableDiffusion3Pipeline, and per-item reproducibility."""

from __future__ import annotations

import pytest
import torch

from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.sampling.sampler import decode_latents, initial_noise, sample_latents

PROMPTS = ["a satellite image of water, road", "a satellite image of farmland, forest, building"]


@pytest.fixture(scope="module")
def pipe(tiny_sd35_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd35_dir)


def encode(pipe):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True)


@pytest.mark.parametrize("dynamic_shift", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_reproduces_the_sd3_pipeline(pipe, dynamic_shift, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=dynamic_shift
    )
    embeds, negative, pooled, negative_pooled = encode(pipe)
    noise = initial_noise([0, 1], seed=3, shape=(16, 8, 12))  # non-square latents
    with torch.no_grad():
        reference = pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled, latents=noise.clone(), height=64, width=96,
            num_inference_steps=5, guidance_scale=guidance, output_type="pt",
        ).images  # fmt: skip
    model = MaskSD3Transformer2DModel.from_sd3(pipe.transformer)  # the mask branch stays unused
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = sample_latents(
        model, scheduler, noise.clone(), embeds, pooled, None, negative, negative_pooled,
        num_inference_steps=5, guidance_scale=guidance,
    ).latents  # fmt: skip
    with torch.no_grad():
        ours = (decode_latents(pipe.vae, latents) + 1) / 2
    assert ours.shape == reference.shape == (2, 3, 64, 96)
    assert (ours - reference).abs().max() <= 1e-4


def test_item_does_not_depend_on_its_batch(pipe, tiny_sd35_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    embeds, negative, pooled, negative_pooled = encode(pipe)
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_init="fresh")
    masks = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(rows: list[int]) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise = initial_noise([10 + r for r in rows], seed=7, shape=(16, 8, 8))
        return sample_latents(
            model, scheduler, noise, embeds[rows], pooled[rows], masks[rows], negative[rows], negative_pooled[rows],
            num_inference_steps=4, guidance_scale=2.0,
        ).latents  # fmt: skip

    together = run([0, 1])
    alone = torch.cat([run([0]), run([1])])
    assert (together - alone).abs().max() <= 1e-5
    assert not torch.allclose(together[0], together[1])
    assert torch.equal(initial_noise([5], 1, (2, 2, 2)), initial_noise([4, 5], 1, (2, 2, 2))[1:])


def test_guidance_needs_the_empty_prompt(pipe, tiny_sd35_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    embeds, _, pooled, _ = encode(pipe)
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="empty-prompt"):
        sample_latents(model, scheduler, torch.randn(2, 16, 8, 8), embeds, pooled, guidance_scale=3.0)


class MaskEcho(torch.nn.Module):
    """A model whose velocity is its mask condition (of the latents' shape): guidance's arithmetic shows in the
    result. Records the prompts it is given."""

    config = type("Config", (), {"patch_size": 2})

    def __init__(self) -> None:
        super().__init__()
        self.embeds: list[torch.Tensor] = []

    def forward(self, hidden_states, encoder_hidden_states, pooled, timestep, return_dict=False, **kwargs):
        self.embeds.append(encoder_hidden_states)
        return (kwargs["mask_hidden_states"] + 0 * hidden_states,)


def test_mask_guidance_moves_away_from_the_null_mask(pipe):
    """One Euler step from σ = 1 to 0 gives noise − v, and v = null + w (mask − null), with the prompt kept in
    both halves; one guidance at a time, and mask guidance needs its null condition."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    embeds, negative, pooled, negative_pooled = encode(pipe)
    masks = torch.rand(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    null = torch.full_like(masks, -1.0)
    noise = initial_noise([0, 1], seed=2, shape=(16, 8, 8))
    model = MaskEcho()

    def run(**kwargs) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        return sample_latents(model, scheduler, noise.clone(), embeds, pooled, masks, num_inference_steps=1, **kwargs)

    torch.testing.assert_close(run().latents, noise - masks)
    guided = run(mask_guidance_scale=3.0, null_mask_latents=null)
    torch.testing.assert_close(guided.latents, noise - (null + 3.0 * (masks - null)))
    assert guided.nfe == 1 and torch.equal(model.embeds[-1], torch.cat([embeds, embeds]))
    with pytest.raises(ValueError, match="null mask"):
        run(mask_guidance_scale=3.0)
    with pytest.raises(ValueError, match="one at a time"):
        run(
            mask_guidance_scale=3.0, null_mask_latents=null, guidance_scale=2.0,
            negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
        )  # fmt: skip
