"""MaskSD3Transformer2DModel against diffusers' SD3 transformer (peer checks), training modes and checkpoints.

Both tiny fixtures are used: SD3.5 (qk RMS norm, dual attention in the first blocks) and SD3 (neither, other
widths). Every block kind is covered: dual attention, plain joint attention and the last `context_pre_only` one.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed
from safetensors.torch import load_file

from crfm.data.index import IGNORE_INDEX
from crfm.models.conditioning import (
    MASK_ENCODINGS,
    check_mask_inputs,
    encode_mask_condition,
    mask_condition_channels,
    mask_embed_in_channels,
    mask_to_class_fractions,
    mask_to_pixels,
    recorded_mask_encoding,
)
from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.models.sd35 import SD35_MEDIUM_TRANSFORMER
from crfm.models.trained_weights import (
    CHECKPOINT_META,
    CHECKPOINT_WEIGHTS,
    TEXT_BRANCH_KEYS,
    configure_training,
    load_trained,
    save_trained,
)
from tests.helpers import perturb_trainable

VARIANTS = ["tiny_sd35_dir", "tiny_sd3_dir"]
TEXT_STREAM_LORA_FORBIDDEN = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "context")
IMAGE_LORA_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
DUAL_LORA_MODULES = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
# The text stream spelled out independently of crfm.model.TEXT_BRANCH_KEYS, so a key dropped there is caught.
TEXT_STREAM = re.compile(
    r"context_embedder|_context\.|\.add_[qkv]_proj\.|\.norm_added_[qk]\.|\.to_add_out\.|text_embedder"
)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


@pytest.fixture(params=VARIANTS)
def pipe_dir(request) -> Path:
    return request.getfixturevalue(request.param)


def make_inputs(model: MaskSD3Transformer2DModel, seed: int = 0, height: int = 8, width: int = 16) -> dict:
    """Batch of 2, non-square latents, a different timestep per sample, 77 CLIP + 16 T5 text tokens."""
    cfg = model.transformer.config
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, cfg.in_channels, height, width, generator=gen),
        "encoder_hidden_states": torch.randn(2, 77 + 16, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([120.0, 830.0]),
    }


def make_mask(inputs: dict, seed: int) -> torch.Tensor:
    return torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def params_without_gradient(model: torch.nn.Module) -> list[str]:
    """Trainable parameters that the last backward left without a gradient or with an all-zero one."""
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and (param.grad is None or not param.grad.any())
    ]


# ---------------------------------------------------------------------------------------------------------
# 1-2: peer checks against diffusers


def test_no_mask_forward_equals_diffusers(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir).eval()
    reference = SD3Transformer2DModel.from_pretrained(pipe_dir / "transformer").eval()
    inputs = make_inputs(model)
    with torch.no_grad():
        ours = model(**inputs).sample
        theirs = reference(**inputs).sample
    assert ours.shape == inputs["hidden_states"].shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_block_with_empty_mask_equals_diffusers_block(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir).eval()
    base = model.transformer
    inputs = make_inputs(model)
    kinds = set()
    with torch.no_grad():
        hidden = base.pos_embed(inputs["hidden_states"]).contiguous()
        temb = base.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        context = base.context_embedder(inputs["encoder_hidden_states"])
        empty = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[-1])
        for block, mask_block in zip(base.transformer_blocks, model.mask_blocks, strict=True):
            kinds.add("dual" if block.use_dual_attention else "pre_only" if block.context_pre_only else "joint")
            ref_context, ref_hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            got_context, got_hidden, got_mask = model._block(block, mask_block, hidden, context, empty, temb)
            assert (got_hidden - ref_hidden).abs().max().item() <= 1e-6
            if block.context_pre_only:
                assert got_context is None and ref_context is None and got_mask is None
            else:
                assert (got_context - ref_context).abs().max().item() <= 1e-6
                assert got_mask.shape == empty.shape
            hidden, context = ref_hidden, ref_context  # chain diffusers' outputs, as its own forward does
    expected = {"joint", "pre_only"} | ({"dual"} if base.config.qk_norm else set())
    assert kinds == expected  # the SD3.5 fixture must exercise dual attention, SD3 must not


# ---------------------------------------------------------------------------------------------------------
# 3-4: the mask branch in the forward pass and in training


def test_mask_conditions_output(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir).eval()
    inputs = make_inputs(model)  # 8x16 latents
    with torch.no_grad():
        plain = model(**inputs).sample
        masked = model(**inputs, mask_hidden_states=make_mask(inputs, 1)).sample
        other = model(**inputs, mask_hidden_states=make_mask(inputs, 2)).sample
        as_tuple = model(**inputs, mask_hidden_states=make_mask(inputs, 1), return_dict=False)
    assert masked.shape == inputs["hidden_states"].shape
    assert torch.isfinite(masked).all()
    assert (masked - plain).abs().max().item() > 1e-4
    assert (masked - other).abs().max().item() > 1e-4
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], masked)
    with pytest.raises(ValueError, match="mask latents"):
        model(**inputs, mask_hidden_states=make_mask(inputs, 1)[..., :8])


def test_full_mode_trains_image_and_mask_streams_only(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    counts = configure_training(model, "full")
    named = dict(model.named_parameters())
    for name, param in named.items():
        is_text = any(key in name for key in TEXT_BRANCH_KEYS)
        assert param.requires_grad != is_text, name
        assert param.requires_grad != bool(TEXT_STREAM.search(name)), name
    for name in (
        "transformer.transformer_blocks.0.attn.to_q.weight",
        "transformer.transformer_blocks.0.ff.net.2.weight",
        "transformer.proj_out.weight",
        "mask_embed.proj.weight",
        "mask_blocks.0.norm1.linear.weight",
        "mask_blocks.0.ff.net.2.weight",
    ):
        assert named[name].requires_grad, name
    for name in ("transformer.context_embedder.weight", "transformer.transformer_blocks.0.attn.add_q_proj.weight"):
        assert not named[name].requires_grad, name
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    assert counts == {"trainable": trainable, "frozen": counts["total"] - trainable, "total": counts["total"]}
    assert counts["total"] == sum(p.numel() for p in named.values()) and 0 < trainable < counts["total"]

    inputs = make_inputs(model)
    mask = make_mask(inputs, 1).requires_grad_(True)
    model(**inputs, mask_hidden_states=mask).sample.square().mean().backward()
    assert mask.grad is not None and mask.grad.abs().max().item() > 0  # the mask reaches the image via attention
    for name, param in named.items():
        assert (param.grad is None) != param.requires_grad, name
    assert not params_without_gradient(model)


def test_lora_mode_targets_image_stream_only(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir).eval()
    inputs = make_inputs(model)
    mask = make_mask(inputs, 1)
    with torch.no_grad():
        before = model(**inputs, mask_hidden_states=mask).sample
    counts = configure_training(model, "lora", lora_rank=4)
    named = dict(model.named_parameters())
    trainable = trainable_names(model)
    mask_branch = {name for name in named if name.startswith(("mask_blocks.", "mask_embed."))}
    lora = trainable - mask_branch
    assert mask_branch <= trainable  # the whole mask branch is trained
    assert lora and all("lora_" in name for name in lora)
    assert not any(key in name for name in lora for key in TEXT_STREAM_LORA_FORBIDDEN)
    # Exactly the image-stream projections carry LoRA, including attn2 in the dual-attention blocks.
    lora_modules = {name.split(".lora_")[0] for name in lora}
    expected = set()
    for index, block in enumerate(model.transformer.transformer_blocks):
        targets = IMAGE_LORA_MODULES + (DUAL_LORA_MODULES if block.use_dual_attention else ())
        expected |= {f"transformer.transformer_blocks.{index}.{module}" for module in targets}
    assert lora_modules == expected
    lora_a = named["transformer.transformer_blocks.0.attn.to_q.lora_A.default.weight"]
    assert lora_a.shape == (4, model.transformer.inner_dim)

    manual = sum(named[name].numel() for name in trainable)
    total = sum(p.numel() for p in named.values())
    assert counts == {"trainable": manual, "frozen": total - manual, "total": total}
    assert counts["trainable"] + counts["frozen"] == counts["total"]
    with torch.no_grad():
        after = model(**inputs, mask_hidden_states=mask).sample
    assert torch.allclose(before, after, atol=1e-6)  # LoRA B starts at zero: adding adapters changes nothing


def test_invalid_train_mode_raises(tiny_sd3_dir):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd3_dir)
    with pytest.raises(ValueError, match="train_mode"):
        configure_training(model, "partial")


# ---------------------------------------------------------------------------------------------------------
# 6: mask-branch initialisation


def test_mask_init_copy_matches_image_stream(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_init="copy").eval()
    base = model.transformer
    dim = base.inner_dim
    for key, value in base.pos_embed.proj.state_dict().items():
        assert torch.equal(model.mask_embed.proj.state_dict()[key], value), key
    temb = torch.randn(2, dim, generator=torch.Generator().manual_seed(3))
    tokens = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(4))
    for block, mask_block in zip(base.transformer_blocks, model.mask_blocks, strict=True):
        # A pre-only (last) block's mask tokens give keys and values only: no query projection to copy.
        names = ("to_k", "to_v") if mask_block.pre_only else ("to_q", "to_k", "to_v")
        assert (mask_block.to_q is None) == mask_block.pre_only == block.context_pre_only
        for name in names:
            assert torch.equal(getattr(mask_block, name).weight, getattr(block.attn, name).weight)
            assert torch.equal(getattr(mask_block, name).bias, getattr(block.attn, name).bias)
        if block.attn.norm_q is not None:
            if not mask_block.pre_only:
                assert torch.equal(mask_block.norm_q.weight, block.attn.norm_q.weight)
            assert torch.equal(mask_block.norm_k.weight, block.attn.norm_k.weight)
        source_w, source_b = block.norm1.linear.weight, block.norm1.linear.bias
        target_w, target_b = mask_block.norm1.linear.weight, mask_block.norm1.linear.bias
        with torch.no_grad():
            image_norm = block.norm1(tokens, emb=temb)
        if block.context_pre_only:
            # AdaLayerNormContinuous chunks (scale, shift); the image's AdaLayerNormZero starts (shift, scale).
            assert torch.equal(target_w, torch.cat([source_w[dim : 2 * dim], source_w[:dim]]))
            assert torch.equal(target_b, torch.cat([source_b[dim : 2 * dim], source_b[:dim]]))
            with torch.no_grad():
                assert torch.allclose(mask_block.norm1(tokens, temb), image_norm[0], atol=1e-6)
        else:
            assert source_w.shape[0] == (9 if block.use_dual_attention else 6) * dim
            assert torch.equal(target_w, source_w[: 6 * dim]) and torch.equal(target_b, source_b[: 6 * dim])
            with torch.no_grad():
                for ours, theirs in zip(mask_block.norm1(tokens, emb=temb), image_norm[:5], strict=True):
                    assert torch.allclose(ours, theirs, atol=1e-6)
            assert torch.equal(mask_block.to_out.weight, block.attn.to_out[0].weight)
            assert torch.equal(mask_block.to_out.bias, block.attn.to_out[0].bias)
            for key, value in block.ff.state_dict().items():
                assert torch.equal(mask_block.ff.state_dict()[key], value), key


def test_mask_init_fresh_starts_with_closed_gates(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_init="fresh").eval()
    base = model.transformer
    for block, mask_block in zip(base.transformer_blocks, model.mask_blocks, strict=True):
        assert torch.count_nonzero(mask_block.norm1.linear.weight) == 0
        assert torch.count_nonzero(mask_block.norm1.linear.bias) == 0
        assert not torch.equal(mask_block.to_k.weight, block.attn.to_k.weight)
    # Zero gates: a mask-stream residual update is the identity, so the mask tokens pass through unchanged.
    inputs = make_inputs(model)
    with torch.no_grad():
        hidden = base.pos_embed(inputs["hidden_states"]).contiguous()
        mask = model._mask_tokens(make_mask(inputs, 1)).contiguous()
        temb = base.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        context = base.context_embedder(inputs["encoder_hidden_states"])
        _, _, mask_out = model._block(base.transformer_blocks[0], model.mask_blocks[0], hidden, context, mask, temb)
    assert torch.equal(mask_out, mask)


def test_invalid_mask_init_raises(tiny_sd3_dir):
    with pytest.raises(ValueError, match="mask_init"):
        MaskSD3Transformer2DModel.from_sd3(tiny_sd3_dir, mask_init="zeros")


# ---------------------------------------------------------------------------------------------------------
# 7-8: checkpoints


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_save_load_trained_is_bit_identical(pipe_dir, mode, tmp_path):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    counts = configure_training(model, mode, lora_rank=4)
    perturb_trainable(model)
    model.eval()
    inputs = make_inputs(model)
    mask = make_mask(inputs, 1)
    meta = {"train_mode": mode, "lora_rank": 4, "num_cls": 6, "base_model": str(pipe_dir)}
    ckpt = save_trained(model, tmp_path / "ckpt", meta=meta)

    loaded, loaded_meta = load_trained(ckpt)
    assert loaded_meta["train_mode"] == mode and loaded_meta["num_cls"] == 6 and loaded_meta["mask_init"] == "copy"
    untrained = MaskSD3Transformer2DModel.from_sd3(pipe_dir).eval()
    configure_training(untrained, mode, lora_rank=4)
    with torch.no_grad():
        expected = model(**inputs, mask_hidden_states=mask).sample
        got = loaded(**inputs, mask_hidden_states=mask).sample
        baseline = untrained(**inputs, mask_hidden_states=mask).sample
    assert torch.equal(got, expected)
    assert not torch.allclose(baseline, expected, atol=1e-5)  # the perturbation matters, so weights were loaded

    # Only trained tensors are stored: no frozen base weight, and the size is that of the trained parameters.
    weights = load_file(str(ckpt / CHECKPOINT_WEIGHTS))
    assert set(weights) == trainable_names(model)
    assert "transformer.context_embedder.weight" not in weights
    size = (ckpt / CHECKPOINT_WEIGHTS).stat().st_size
    assert 4 * counts["trainable"] <= size <= 4 * counts["trainable"] + 64 * 1024
    assert size < 4 * counts["total"] - 4 * counts["frozen"] // 2
    if mode == "lora":
        assert size < 0.5 * 4 * counts["total"]


def test_load_trained_rejects_other_architecture(tiny_sd35_dir, tiny_sd3_dir, tmp_path):
    for source, other in ((tiny_sd35_dir, tiny_sd3_dir), (tiny_sd3_dir, tiny_sd35_dir)):
        model = MaskSD3Transformer2DModel.from_sd3(source)
        configure_training(model, "full")
        meta = {"train_mode": "full", "lora_rank": 4, "num_cls": 6, "base_model": str(source)}
        ckpt = save_trained(model, tmp_path / source.name, meta=meta)
        with pytest.raises(ValueError, match="does not fit"):
            load_trained(ckpt, pretrained=other)


def test_load_trained_rejects_same_keys_other_widths(tiny_sd3_dir, tmp_path):
    """A base with the same layer layout but other widths has exactly the checkpoint's keys; the shapes differ.

    Regression: load_trained once let this through to torch's RuntimeError instead of its own ValueError.
    """
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd3_dir)
    configure_training(model, "full")
    meta = {"train_mode": "full", "lora_rank": 4, "num_cls": 6, "base_model": str(tiny_sd3_dir)}
    ckpt = save_trained(model, tmp_path / "ckpt", meta=meta)
    config = {k: v for k, v in model.transformer.config.items() if not k.startswith("_")}
    config.update(attention_head_dim=16, caption_projection_dim=2 * 16)  # 2 heads x 16 instead of 2 x 24
    SD3Transformer2DModel(**config).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="does not fit"):
        load_trained(ckpt, pretrained=tmp_path / "narrow")


def test_load_trained_without_meta_raises(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_META):
        load_trained(tmp_path / "ckpt")


def _roundtrip_pretrained(model: MaskSD3Transformer2DModel, out_dir: Path) -> None:
    perturb_trainable(model)  # mask branch and base moved away from any init a reload could recompute
    model.eval()
    inputs = make_inputs(model)
    mask = make_mask(inputs, 1)
    model.save_pretrained(out_dir)
    loaded = MaskSD3Transformer2DModel.from_pretrained(out_dir).eval()
    assert loaded.config.mask_init == model.config.mask_init
    with torch.no_grad():
        assert torch.equal(
            loaded(**inputs, mask_hidden_states=mask).sample, model(**inputs, mask_hidden_states=mask).sample
        )


@pytest.mark.parametrize("mask_init", ["copy", "fresh"])
def test_save_pretrained_roundtrip_from_transformer(tiny_sd35_dir, mask_init, tmp_path):
    transformer = SD3Transformer2DModel.from_pretrained(str(tiny_sd35_dir), subfolder="transformer")
    _roundtrip_pretrained(MaskSD3Transformer2DModel.from_sd3(transformer, mask_init=mask_init), tmp_path / "m")


def test_save_pretrained_roundtrip_from_pipeline_dir(pipe_dir, tmp_path):
    """Regression: `from_sd3(path)` once copied `_name_or_path` (a Path) into the nested config, which
    `save_pretrained` could not write as JSON."""
    _roundtrip_pretrained(MaskSD3Transformer2DModel.from_sd3(pipe_dir), tmp_path / "m")


# ---------------------------------------------------------------------------------------------------------
# 9-10: gradient checkpointing, mask rendering


def test_gradient_checkpointing_matches(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    configure_training(model, "full")
    inputs = make_inputs(model)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        mask = make_mask(inputs, 1).requires_grad_(True)
        out = model(**inputs, mask_hidden_states=mask).sample
        out.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach(), {**grads, "<mask latents>": mask.grad.clone()}

    plain_out, plain_grads = run()
    model.enable_gradient_checkpointing()
    calls = []
    checkpoint_func = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda *args: calls.append(1) or checkpoint_func(*args)
    ckpt_out, ckpt_grads = run()
    assert len(calls) == len(model.mask_blocks)  # every block really went through checkpointing
    assert (ckpt_out - plain_out).abs().max().item() <= 1e-6
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 1
    for name, grad in plain_grads.items():
        assert (ckpt_grads[name] - grad).abs().max().item() <= 1e-6, name


def test_mask_to_pixels():
    num_cls = 6
    label = torch.tensor([[[0, 1, 2, 3], [4, 5, IGNORE_INDEX, 0]], [[5, 4, 3, 2], [1, 0, 0, IGNORE_INDEX]]])
    pixels = mask_to_pixels(label, num_cls)
    assert pixels.shape == (2, 3, 2, 4) and pixels.dtype == torch.float32
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    grey = label.double() * 255.0 / num_cls
    grey[label == IGNORE_INDEX] = 255.0
    expected = (grey / 127.5 - 1.0).float()
    assert torch.allclose(pixels[:, 0], expected, atol=1e-6)
    assert pixels[0, 0, 0, 0].item() == -1.0  # class 0 is black
    assert torch.all(pixels[:, 0][label == IGNORE_INDEX] == 1.0)  # ignore is white
    assert torch.all(pixels[:, 0][label != IGNORE_INDEX] < 1.0)  # no class collides with ignore


def test_fresh_init_checkpoint_roundtrip(tiny_sd3_dir, tmp_path):
    # A fresh mask branch is re-drawn at random on rebuild, so only the stored weights can make outputs agree.
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd3_dir, mask_init="fresh")
    configure_training(model, "lora", lora_rank=4)
    perturb_trainable(model)
    model.eval()
    meta = {"train_mode": "lora", "lora_rank": 4, "num_cls": 6, "base_model": str(tiny_sd3_dir)}
    ckpt = save_trained(model, tmp_path / "ckpt", meta=meta)
    info = json.loads((ckpt / CHECKPOINT_META).read_text())
    assert info["mask_init"] == "fresh" and info["lora_rank"] == 4 and info["base_model"] == str(tiny_sd3_dir)
    torch.manual_seed(123)  # a different RNG state than at save time
    loaded, _ = load_trained(ckpt)
    assert loaded.config.mask_init == "fresh"
    inputs = make_inputs(model)
    mask = make_mask(inputs, 1)
    with torch.no_grad():
        assert torch.equal(
            loaded(**inputs, mask_hidden_states=mask).sample, model(**inputs, mask_hidden_states=mask).sample
        )


# ---------------------------------------------------------------------------------------------------------
# 11: mask encodings (grey, palette: VAE latents; onehot: num_cls class fractions per latent cell)


def encoded_masks(pipe_dir: Path, encoding: str, seeds: tuple[int, ...] = (1, 2)) -> list[torch.Tensor]:
    """For each seed, a batch of 2 random 64x128 px masks (8x16 latents, as make_inputs) in `encoding`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipe_dir, subfolder="vae").eval()
    masks = []
    for seed in seeds:
        label = torch.randint(0, 6, (2, 64, 128), generator=torch.Generator().manual_seed(seed))
        label[:, :8] = IGNORE_INDEX
        with torch.no_grad():
            masks.append(encode_mask_condition(vae, label, 6, encoding))
    return masks


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_each_mask_encoding_conditions_the_output(pipe_dir, encoding):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_in_channels=mask_embed_in_channels(encoding, 6))
    configure_training(model, "full")
    inputs = make_inputs(model)
    first, second = encoded_masks(pipe_dir, encoding)
    channels = mask_condition_channels(encoding, 6, model.transformer.config.in_channels)
    assert first.shape == (2, channels, 8, 16) and model.mask_channels == channels
    out = model(**inputs, mask_hidden_states=first).sample
    with torch.no_grad():
        other = model(**inputs, mask_hidden_states=second).sample
        plain = model(**inputs).sample
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    assert (out - other).abs().max().item() > 1e-4  # another mask, another velocity
    assert (out - plain).abs().max().item() > 1e-4
    out.square().mean().backward()
    assert model.mask_embed.proj.weight.grad.abs().max().item() > 0


def test_onehot_copy_init_copies_positions_and_blocks_not_the_projection(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_init="copy", mask_in_channels=6)
    base = model.transformer
    patch = base.config.patch_size
    assert model.mask_embed.proj.weight.shape == (base.inner_dim, 6, patch, patch)
    assert base.pos_embed.proj.weight.shape[1] == base.config.in_channels != 6
    assert model.mask_embed.pos_embed is None  # positions come from the image's table
    block, mask_block = base.transformer_blocks[0], model.mask_blocks[0]
    assert torch.equal(mask_block.to_q.weight, block.attn.to_q.weight)
    # An old config (no mask_in_channels) means VAE latents: the whole patch embedding is copied.
    assert MaskSD3Transformer2DModel.from_sd3(pipe_dir).config.mask_in_channels is None


def test_the_mask_condition_shape_is_checked(tiny_sd35_dir):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=6).eval()
    inputs = make_inputs(model)
    latent_shaped = make_mask(inputs, 1)  # 16 channels, as a grey/palette model would take
    with pytest.raises(ValueError, match=r"mask latents \(2, 16, 8, 16\) do not fit .*expected \(2, 6, 8, 16\)"):
        model(**inputs, mask_hidden_states=latent_shaped)
    with pytest.raises(ValueError, match="do not fit"):
        model(**inputs, mask_hidden_states=torch.zeros(1, 6, 8, 16))  # batch
    with pytest.raises(ValueError, match="do not fit"):
        model(**inputs, mask_hidden_states=torch.zeros(2, 6, 8, 8))  # size
    with pytest.raises(ValueError, match="mask_in_channels"):
        MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=0)


def test_sd35_medium_shaped_onehot_trains():
    """SD3.5-medium's layout (16 latent channels, patch 2, 384-token position grid, qk RMS-norm, dual attention
    then joint then the last block) at small widths, with 7 classes one-hot: nothing assumes mask channels ==
    latent channels."""
    config = {
        **SD35_MEDIUM_TRANSFORMER,
        "num_layers": 3,
        "dual_attention_layers": (0,),
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "joint_attention_dim": 32,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 24,
    }
    assert config["in_channels"] == 16 and config["patch_size"] == 2
    torch.manual_seed(0)
    model = MaskSD3Transformer2DModel.from_sd3(SD3Transformer2DModel(**config), mask_in_channels=7)
    configure_training(model, "full")
    label = torch.randint(0, 7, (2, 64, 96), generator=torch.Generator().manual_seed(0))
    label[:, :16] = IGNORE_INDEX
    mask = mask_to_class_fractions(label, 7, 8)  # SD3's VAE factor
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 16, 8, 12, generator=gen),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=gen),
        "pooled_projections": torch.randn(2, 24, generator=gen),
        "timestep": torch.tensor([100.0, 700.0]),
    }
    out = model(**inputs, mask_hidden_states=mask).sample
    assert mask.shape == (2, 7, 8, 12) and out.shape == (2, 16, 8, 12) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert model.mask_embed.proj.weight.grad.abs().max().item() > 0
    assert model.mask_blocks[0].to_k.weight.grad.abs().max().item() > 0


# ---------------------------------------------------------------------------------------------------------
# 12: the mask encoding in checkpoints


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_checkpoint_records_the_mask_encoding_and_load_trained_rebuilds_it(tiny_sd35_dir, encoding, tmp_path):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=mask_embed_in_channels(encoding, 6))
    configure_training(model, "full")
    perturb_trainable(model)
    model.eval()
    meta = {"train_mode": "full", "num_cls": 6, "base_model": str(tiny_sd35_dir), "mask_encoding": encoding}
    ckpt = save_trained(model, tmp_path / "ckpt", meta=meta)
    assert json.loads((ckpt / CHECKPOINT_META).read_text())["mask_encoding"] == encoding
    loaded, loaded_meta = load_trained(ckpt)
    assert recorded_mask_encoding(loaded_meta) == encoding
    assert loaded.config.mask_in_channels == model.config.mask_in_channels == mask_embed_in_channels(encoding, 6)
    inputs = make_inputs(model)
    (mask,) = encoded_masks(tiny_sd35_dir, encoding, seeds=(3,))
    with torch.no_grad():
        assert torch.equal(
            loaded(**inputs, mask_hidden_states=mask).sample, model(**inputs, mask_hidden_states=mask).sample
        )


def test_checkpoint_without_mask_encoding_loads_as_grey(trained_checkpoint):
    assert "mask_encoding" not in json.loads((trained_checkpoint / CHECKPOINT_META).read_text())
    model, meta = load_trained(trained_checkpoint)
    assert recorded_mask_encoding(meta) == "grey"
    assert model.config.mask_in_channels is None and model.mask_channels == model.transformer.config.in_channels


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_the_model_config_records_what_the_mask_branch_is_trained_on(tiny_sd35_dir, encoding, tmp_path):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_encoding=encoding, num_cls=6)
    assert (model.config.mask_encoding, model.config.num_cls) == (encoding, 6)
    assert model.config.mask_in_channels == mask_embed_in_channels(encoding, 6)
    configure_training(model, "full")
    # The checkpoint's record comes from the model, whatever the caller's meta leaves out.
    ckpt = save_trained(model, tmp_path / "ckpt", meta={"train_mode": "full", "base_model": str(tiny_sd35_dir)})
    recorded = json.loads((ckpt / CHECKPOINT_META).read_text())
    assert (recorded["mask_encoding"], recorded["num_cls"]) == (encoding, 6)
    loaded, _ = load_trained(ckpt)
    assert (loaded.config.mask_encoding, loaded.config.num_cls) == (encoding, 6)
    # The whole model saved diffusers' way keeps them too.
    model.save_pretrained(tmp_path / "whole")
    assert MaskSD3Transformer2DModel.from_pretrained(tmp_path / "whole").config.mask_encoding == encoding
    with pytest.raises(ValueError, match="meta says num_cls 7"):
        save_trained(model, tmp_path / "other", meta={"train_mode": "full", "num_cls": 7})


@pytest.mark.parametrize("encoding", ["grey", "onehot", None])
def test_old_checkpoints_whose_meta_holds_the_inputs_still_load(tiny_sd35_dir, encoding, tmp_path):
    """Checkpoints written before the model's config kept them: mask_in_channels only, the inputs in the meta JSON
    (or, older still, no encoding at all: grey)."""
    channels = mask_embed_in_channels(encoding or "grey", 6)
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=channels)
    assert model.config.mask_encoding is None and model.config.num_cls is None
    configure_training(model, "full")
    perturb_trainable(model)
    meta = {"train_mode": "full", "num_cls": 6, "base_model": str(tiny_sd35_dir)}
    ckpt = save_trained(model, tmp_path / "ckpt", meta={**meta, **({"mask_encoding": encoding} if encoding else {})})
    loaded, loaded_meta = load_trained(ckpt)
    assert (loaded.config.mask_encoding, loaded.config.num_cls) == (encoding or "grey", 6)
    assert loaded.config.mask_in_channels == channels
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with pytest.raises(ValueError, match="trained with num_cls=6, not --num_cls 7"):
        check_mask_inputs(loaded.config, ckpt, num_cls=7)  # one check: a model's config or a checkpoint's meta
    with pytest.raises(ValueError, match="trained with num_cls=6, not --num_cls 7"):
        check_mask_inputs(loaded_meta, ckpt, num_cls=7)


def test_a_config_encoding_and_channels_must_agree(tiny_sd35_dir):
    with pytest.raises(ValueError, match="does not fit mask_encoding 'onehot'"):
        MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir, mask_in_channels=5, mask_encoding="onehot", num_cls=6)


def test_save_trained_refuses_a_meta_of_another_encoding(tiny_sd35_dir, tmp_path):
    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)  # a grey/palette mask branch
    configure_training(model, "full")
    meta = {"train_mode": "full", "num_cls": 6, "base_model": str(tiny_sd35_dir), "mask_encoding": "onehot"}
    with pytest.raises(ValueError, match="mask_encoding 'onehot'"):
        save_trained(model, tmp_path / "ckpt", meta=meta)
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------------
# 13: memory layout: one position table, no trainable parameter without a gradient, earlier layouts still load


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_every_trainable_parameter_gets_a_gradient(pipe_dir, mode):
    """The backward that lists the trained parameters no gradient reaches: none (the last mask block once had a
    query projection whose output was dropped, trained for nothing)."""
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    configure_training(model, mode, lora_rank=4)
    perturb_trainable(model)  # LoRA B starts at zero, which would leave LoRA A without a gradient at step 0
    inputs = make_inputs(model)
    model(**inputs, mask_hidden_states=make_mask(inputs, 1)).sample.square().mean().backward()
    assert params_without_gradient(model) == []
    last = model.mask_blocks[-1]
    assert last.pre_only and last.to_q is None and last.norm_q is None


def test_image_and_mask_tokens_share_one_position_table(pipe_dir, tmp_path):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    assert [name for name, _ in model.named_buffers()] == ["transformer.pos_embed.pos_embed"]
    assert model.mask_embed.pos_embed is None
    model.save_pretrained(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    assert "mask_embed.pos_embed" not in saved and "transformer.pos_embed.pos_embed" in saved


def earlier_layout(model: MaskSD3Transformer2DModel, seed: int = 5) -> MaskSD3Transformer2DModel:
    """A copy of `model` computing the mask path as the earlier layout did, from the same weights: the mask
    embedder holds its own position table (diffusers' `PatchEmbed`, the table copied over by hand) and the last
    block's mask tokens have a real query projection (random: its output is dropped, whatever it is)."""
    reference = copy.deepcopy(model)
    base, cfg = reference.transformer, reference.transformer.config
    embed = PatchEmbed(
        height=cfg.sample_size,
        width=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=reference.mask_channels,
        embed_dim=base.inner_dim,
        pos_embed_max_size=cfg.pos_embed_max_size,
    )
    embed.proj.load_state_dict(reference.mask_embed.proj.state_dict())
    with torch.no_grad():
        embed.pos_embed.copy_(base.pos_embed.pos_embed)
    reference.old_mask_embed = embed
    # An instance attribute (a plain function, not a module) shadows the method: diffusers' PatchEmbed forward.
    reference._mask_tokens = lambda mask: reference.old_mask_embed(mask)
    last = reference.mask_blocks[-1]
    torch.manual_seed(seed)
    last.to_q = torch.nn.Linear(base.inner_dim, base.inner_dim)
    last.norm_q = copy.deepcopy(last.norm_k)
    if last.norm_q is not None:
        with torch.no_grad():
            last.norm_q.weight.uniform_(0.5, 1.5)
    return reference


def test_mask_path_equals_the_earlier_layout_bit_for_bit(pipe_dir):
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    configure_training(model, "full")
    perturb_trainable(model)
    model.eval()
    reference = earlier_layout(model).eval()
    assert reference.mask_blocks[-1].to_q is not None and "_mask_tokens" in vars(reference)
    for seed, (height, width) in enumerate([(8, 16), (16, 8)]):
        inputs = make_inputs(model, seed=seed, height=height, width=width)
        mask = make_mask(inputs, seed + 1)
        with torch.no_grad():
            ours = model(**inputs, mask_hidden_states=mask).sample
            theirs = reference(**inputs, mask_hidden_states=mask).sample
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours_bf16 = model(**inputs, mask_hidden_states=mask).sample
                theirs_bf16 = reference(**inputs, mask_hidden_states=mask).sample
        assert torch.equal(ours, theirs) and torch.equal(ours_bf16, theirs_bf16)
    with torch.no_grad():  # the reference really reads its own table
        reference.old_mask_embed.pos_embed.mul_(2)
        assert not torch.equal(reference(**inputs, mask_hidden_states=mask).sample, ours)


def legacy_tensors(model: MaskSD3Transformer2DModel, seed: int = 9) -> dict[str, torch.Tensor]:
    """What the earlier layout held besides this one's weights: the last mask block's query projection (and its
    qk-norm), values as training left them (here random)."""
    gen = torch.Generator().manual_seed(seed)
    dim, head = model.transformer.inner_dim, model.transformer.config.attention_head_dim
    prefix = f"mask_blocks.{len(model.mask_blocks) - 1}"
    tensors = {f"{prefix}.to_q.weight": torch.randn(dim, dim, generator=gen), f"{prefix}.to_q.bias": torch.randn(dim)}
    if model.transformer.config.qk_norm:
        tensors[f"{prefix}.norm_q.weight"] = torch.rand(head, generator=gen) + 0.5
    return tensors


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trained_checkpoint_of_the_earlier_layout_loads(pipe_dir, mode, tmp_path):
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from crfm.models.trained_weights import EMA_WEIGHTS, load_ema_state, trained_state_dict

    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    configure_training(model, mode, lora_rank=4)
    perturb_trainable(model)
    model.eval()
    meta = {"train_mode": mode, "lora_rank": 4, "num_cls": 6, "base_model": str(pipe_dir)}
    ckpt = save_trained(model, tmp_path / "ckpt", meta=meta)
    # Rewritten by hand as the earlier layout wrote it: the dead query projection was trained, hence stored.
    old = {**load_file(str(ckpt / CHECKPOINT_WEIGHTS)), **legacy_tensors(model)}
    save_file(old, str(ckpt / CHECKPOINT_WEIGHTS))
    save_file(old, str(ckpt / EMA_WEIGHTS), metadata={"optimization_step": "7"})

    loaded, _ = load_trained(ckpt)  # reads the EMA file
    inputs = make_inputs(model)
    mask = make_mask(inputs, 1)
    with torch.no_grad():
        assert torch.equal(
            loaded(**inputs, mask_hidden_states=mask).sample, model(**inputs, mask_hidden_states=mask).sample
        )
    # Resuming with --use_ema restores the average from that file too.
    names = list(trained_state_dict(model))
    ema = EMAModel([p for p in model.parameters() if p.requires_grad])
    load_ema_state(ema, ckpt, names)
    assert ema.optimization_step == 7
    assert all(torch.equal(shadow, old[name]) for name, shadow in zip(names, ema.shadow_params, strict=True))


def test_whole_model_folder_of_the_earlier_layout_loads(tiny_sd35_dir, tmp_path):
    from safetensors.torch import save_file

    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    perturb_trainable(model)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    weights_file = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    old = {**load_file(str(weights_file)), **legacy_tensors(model)}
    old["mask_embed.pos_embed"] = model.transformer.pos_embed.pos_embed.clone()  # the second table it stored
    save_file(old, str(weights_file), metadata={"format": "pt"})
    loaded = MaskSD3Transformer2DModel.from_pretrained(tmp_path / "m").eval()
    inputs = make_inputs(model)
    mask = make_mask(inputs, 1)
    with torch.no_grad():
        assert torch.equal(
            loaded(**inputs, mask_hidden_states=mask).sample, model(**inputs, mask_hidden_states=mask).sample
        )


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_mask_add_starts_as_no_change_trains_and_round_trips(pipe_dir, mode, tmp_path):
    """`mask_add`: zero-initialised, so the model starts as the one without it; its projection is trained in both
    modes and frozen by nothing else; the checkpoint records it and rebuilds it, and the addition is local: a change
    of the mask at one token moves that image token's output before any attention mixes them."""
    without = MaskSD3Transformer2DModel.from_sd3(pipe_dir).eval()
    added = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_add=True).eval()
    inputs = make_inputs(without)
    mask = make_mask(inputs, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            added(**inputs, mask_hidden_states=mask).sample, without(**inputs, mask_hidden_states=mask).sample
        )
    assert without.mask_add_proj is None and "mask_add_proj" not in str(trainable_names(without))
    configure_training(added, mode, lora_rank=4)
    assert {"mask_add_proj.weight", "mask_add_proj.bias"} <= trainable_names(added)
    perturb_trainable(added)
    added.eval()
    meta = {"train_mode": mode, "lora_rank": 4, "num_cls": 6, "base_model": str(pipe_dir)}
    ckpt = save_trained(added, tmp_path / "ckpt", meta=meta)
    loaded, loaded_meta = load_trained(ckpt)
    assert loaded_meta["mask_add"] is True and loaded.config.mask_add
    with torch.no_grad():
        expected = added(**inputs, mask_hidden_states=mask).sample
        assert torch.equal(loaded(**inputs, mask_hidden_states=mask).sample, expected)
        tokens = added.transformer.pos_embed(inputs["hidden_states"])
        moved = mask.clone()
        moved[..., :2, :2] += 1.0  # the first patch only
        first = added.mask_add_proj(added._mask_tokens(mask)) - added.mask_add_proj(added._mask_tokens(moved))
    assert tokens.shape == first.shape and first[:, 0].abs().max() > 1e-4 and first[:, 1:].abs().max() == 0
    no_add = save_trained(without_trained(pipe_dir, mode), tmp_path / "plain", meta=meta)
    assert "mask_add" not in json.loads((no_add / CHECKPOINT_META).read_text())


def without_trained(pipe_dir, mode: str) -> MaskSD3Transformer2DModel:
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    configure_training(model, mode, lora_rank=4)
    return model
