"""bench/bench_sampling.py part 1: ours vs StableDiffusion3Pipeline on the same transformer and inputs."""

from __future__ import annotations

import re

import torch

from tests.helpers import load_script


def test_the_samplers_give_the_same_latents_and_both_are_timed(tiny_sd35_dir):
    from diffusers import StableDiffusion3Pipeline

    from crfm.models.mmdit import MaskSD3Transformer2DModel

    bench = load_script("bench/bench_sampling.py")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35_dir)
    pipe.set_progress_bar_config(disable=True)
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    config, gen = model.transformer.config, torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 20, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=gen)
    rows = dict(bench.sampler_vs_pipeline(pipe, model, embeds, pooled, repeats=1))
    ratio = next(key for key in rows if key.startswith("ratio"))
    assert "latents identical: True" in ratio and float(rows[ratio]) > 0
    loops = next(value for key, value in rows.items() if "stubbed" in key)
    assert re.fullmatch(r"[0-9.]+ ms / [0-9.]+ ms", loops)
