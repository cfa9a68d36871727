"""The tiny offline pipeline must be a real diffusers SD3 directory that loads and generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("fixture", ["tiny_sd35_dir", "tiny_sd3_dir"])
def test_tiny_pipeline_loads_offline_and_generates(fixture, request):
    from diffusers import StableDiffusion3Pipeline

    path = request.getfixturevalue(fixture)
    assert {p.name for p in path.iterdir()} >= {
        "model_index.json",
        "transformer",
        "vae",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    }
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    out = pipe(
        "a satellite image of water, road",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    assert out.std() > 0  # an image, not a constant


def test_sd35_config_has_qk_norm_and_dual_attention(tiny_sd35_dir, tiny_sd3_dir):
    sd35 = json.loads((tiny_sd35_dir / "transformer" / "config.json").read_text())
    sd3 = json.loads((tiny_sd3_dir / "transformer" / "config.json").read_text())
    assert sd35["qk_norm"] == "rms_norm" and len(sd35["dual_attention_layers"]) > 0
    assert sd3["qk_norm"] is None and sd3["dual_attention_layers"] == []
    # Widths are consistent with the text encoders, as in the real SD3.
    te1 = json.loads((tiny_sd3_dir / "text_encoder" / "config.json").read_text())
    te2 = json.loads((tiny_sd3_dir / "text_encoder_2" / "config.json").read_text())
    t5 = json.loads((tiny_sd3_dir / "text_encoder_3" / "config.json").read_text())
    assert sd3["pooled_projection_dim"] == te1["projection_dim"] + te2["projection_dim"]
    assert sd3["joint_attention_dim"] == t5["d_model"]


def test_tiny_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from crfm.toy.tiny import main

    assert main([str(tmp_path / "a"), "--layers", "2", "--seed", "3"]) == 0
    assert main([str(tmp_path / "b"), "--layers", "2", "--seed", "3"]) == 0
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_flags_snake_case_with_hyphenated_aliases(tmp_path, capsys):
    from crfm.toy.tiny import build_parser, main

    parser = build_parser()
    snake = ["out", "--sample_size", "16", "--vae_channels", "8,16,16", "--pos_embed_max_size", "8", "--head_dim", "8"]
    snake += ["--latent_channels", "4", "--fit_vae_on", "i.jsonl", "--vae_steps", "5", "--vae_size", "32"]
    hyphenated = [a.replace("_", "-") if a.startswith("--") else a for a in snake]
    assert vars(parser.parse_args(snake)) == vars(parser.parse_args(hyphenated))
    args = parser.parse_args(snake)
    assert (args.sample_size, args.vae_channels, args.fit_vae_on) == (16, (8, 16, 16), Path("i.jsonl"))
    # A missing --fit_vae_on index is refused before the pipeline is built.
    assert main([str(tmp_path / "p"), "--fit_vae_on", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: --fit_vae_on: no index file at ")
    assert not (tmp_path / "p").exists()


def test_tokenizers_behave_like_sd3s(tiny_sd35_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    prompt = "a satellite image of farmland, forest, road, building"
    clip_l = CLIPTokenizer.from_pretrained(tiny_sd35_dir / "tokenizer")
    clip_g = CLIPTokenizer.from_pretrained(tiny_sd35_dir / "tokenizer_2")
    t5 = T5TokenizerFast.from_pretrained(tiny_sd35_dir / "tokenizer_3")
    for tok in (clip_l, clip_g):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == 77
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens[0] == "<|startoftext|>"
        assert "farmland</w>" in tokens and tok.unk_token_id not in ids[1:12]  # 11 word tokens, then <eos>
    # CLIP-L pads with <|endoftext|>, CLIP-G with "!" — as the real SD3 tokenizers.
    assert clip_l.pad_token == "<|endoftext|>" and clip_g.pad_token == "!"
    t5_ids = t5(prompt).input_ids
    assert t5_ids[-1] == t5.eos_token_id and t5.unk_token_id not in t5_ids
    assert t5.pad_token_id == 0


def test_demo_shape_4x_vae_few_latent_channels_unit_position_grid(tmp_path):
    """The demo's shape: 3 VAE blocks (4x), 4 latent channels, and a position grid of exactly the token count,
    which spaces neighbouring positions one unit apart (the default grid spaces them 1/8 apart)."""
    from diffusers import StableDiffusion3Pipeline

    from crfm.toy.tiny import TinyConfig, save_tiny_pipeline

    config = TinyConfig(vae_channels=(8, 16, 16), latent_channels=4, sample_size=16, pos_embed_max_size=8, layers=2)
    pipe = StableDiffusion3Pipeline.from_pretrained(save_tiny_pipeline(tmp_path / "p", config))
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.in_channels == 4
    embed = pipe.transformer.pos_embed
    grid = embed.pos_embed.reshape(8, 8, -1)
    assert embed.base_size == 8 and grid.shape[:2] == (8, 8)
    # Frequency-1 sine of each axis' half of the sin-cos table: sin(position), positions 0, 1, 2, ... apart by 1.
    half = grid.shape[-1] // 2
    torch.testing.assert_close(grid[0, :, 0], torch.sin(torch.arange(8.0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(grid[:, 0, half], torch.sin(torch.arange(8.0)), atol=1e-5, rtol=0)
    out = pipe("a satellite image of water", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
