"""The mask model at SD3.5-medium's true widths, on the CPU: 2 of its 24 layers, randomly initialised.

SD3.5-medium has dual attention in layers 0..12, plain joint attention after, and a `context_pre_only` last
layer; here block 0 is dual and block 1 is the (plain) last one, so every block kind runs at width 1536 with the
real embedders (4096-wide T5 tokens, 2048-wide pooled CLIP, 384x384 position table). 256 px (32x32 latents),
batch 1, 8 text tokens. Parameter counts are checked against numbers derived here from the config alone.

The position table is a 384*384*1536 float32 buffer (~0.9 GB) of the image patch embedder, which the mask branch
reads too (one table), so a model takes ~1.8 GB; models live in class-scoped fixtures and are dropped when their
class is done.
"""

from __future__ import annotations

import gc
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models import embeddings
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.models.sd35 import SD35_MEDIUM_TRANSFORMER as SD35_MEDIUM
from crfm.models.trained_weights import CHECKPOINT_WEIGHTS, configure_training, load_trained, save_trained
from tests.helpers import perturb_trainable

CONFIG = {**SD35_MEDIUM, "num_layers": 2, "dual_attention_layers": (0,)}
LORA_RANK = 16  # train.py's default
TEXT_TOKENS = 8
# The text stream spelled out independently of crfm's TEXT_BRANCH_KEYS.
TEXT_STREAM = re.compile(
    r"context_embedder|_context\.|\.add_[qkv]_proj\.|\.norm_added_[qk]\.|\.to_add_out\.|text_embedder"
)
LAST = CONFIG["num_layers"] - 1


# ---------------------------------------------------------------------------------------------------------
# Parameter counts from the config alone


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def expected_counts(cfg: dict, rank: int) -> dict[str, int]:
    """Parameter counts by component, by formula: every Linear has a bias, RMSNorm has a weight of head size."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert cfg["caption_projection_dim"] == d
    qk_norm = 2 * cfg["attention_head_dim"] if cfg["qk_norm"] == "rms_norm" else 0
    ff = _linear(d, 4 * d) + _linear(4 * d, d)
    full_stream = _linear(d, 6 * d) + 4 * _linear(d, d) + qk_norm + ff  # AdaLN-Zero, q/k/v/out, qk-norm, MLP
    pre_only_stream = _linear(d, 2 * d) + 3 * _linear(d, d) + qk_norm  # AdaLN-continuous, q/k/v only
    # The mask tokens of the last block only give keys/values: no query projection, no q-norm.
    pre_only_mask = _linear(d, 2 * d) + 2 * _linear(d, d) + qk_norm // 2
    patch_embed = cfg["in_channels"] * cfg["patch_size"] ** 2 * d + d
    layers, dual = cfg["num_layers"], set(cfg["dual_attention_layers"])

    image = text = mask = lora = 0
    for index in range(layers):
        last = index == layers - 1
        image += full_stream  # the image stream is never pre-only
        lora += rank * (4 * (d + d) + (d + 4 * d) + (4 * d + d))  # q, k, v, out; ff.net.0.proj; ff.net.2
        if index in dual:
            image += _linear(d, 3 * d) + 4 * _linear(d, d) + qk_norm  # 3 more AdaLN chunks and attn2
            lora += rank * 4 * (d + d)
        text += pre_only_stream if last else full_stream
        mask += pre_only_mask if last else full_stream
    text += _linear(cfg["joint_attention_dim"], d) + _linear(cfg["pooled_projection_dim"], d) + _linear(d, d)
    rest = patch_embed + _linear(256, d) + _linear(d, d)  # image patch embed, timestep embedder
    rest += _linear(d, 2 * d) + _linear(d, cfg["patch_size"] ** 2 * cfg["out_channels"])  # norm_out, proj_out
    mask += patch_embed
    total = image + text + mask + rest
    return {
        "total": total,
        "text": text,
        "mask_branch": mask,
        "lora": lora,
        "full_trainable": total - text,
        "lora_trainable": lora + mask,
    }


def test_expected_counts_anchor():
    """The formula's values for SD3.5-medium itself (24 layers; docs/memory.md, bench/real_dimensions.py) and for
    the 2-layer model below."""
    real = expected_counts(SD35_MEDIUM, LORA_RANK)
    assert real["total"] - real["mask_branch"] == 2_243_171_520
    assert real["mask_branch"] == 986_824_640  # 989,185,536 with the last block's unused query (2,360,896)
    assert real["lora"] == 13_172_736
    small = expected_counts(CONFIG, LORA_RANK)
    assert small["total"] == 227_312_000 and small["lora"] == 1_081_344


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the base saved once per module, one mask model per mode (class)


@pytest.fixture(scope="module", autouse=True)
def reuse_position_table():
    """Every PatchEmbed recomputes the 384x384x1536 sin-cos table in float64 (~5 s, ~4 GB peak on 2 cores) and
    this module builds nine of them; reuse the first one (a fresh float32 copy each time, which is what
    PatchEmbed stores). Same values, so nothing under test changes; undone after the module."""
    original = embeddings.get_2d_sincos_pos_embed
    cache: dict = {}

    def cached(embed_dim, grid_size, **kwargs):
        key = (embed_dim, grid_size, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(embed_dim, grid_size, **kwargs).float()
        return cache[key].clone()

    patch = pytest.MonkeyPatch()
    patch.setattr(embeddings, "get_2d_sincos_pos_embed", cached)
    yield
    patch.undo()
    cache.clear()


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Iterator[Path]:
    """A pipeline-like folder holding only `transformer/` (all `from_sd3`/`load_trained` read): the 2-layer base,
    randomly initialised (seeded); saved, then dropped from memory. 1.6 GB on disk (0.9 GB of it the position
    table, a persistent buffer), removed after the module rather than left to pytest's tmp retention."""
    root = tmp_path_factory.mktemp("sd35_medium_2l")
    torch.manual_seed(0)
    SD3Transformer2DModel(**CONFIG).save_pretrained(root / "transformer")
    gc.collect()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 32, 32, generator=gen),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(1, CONFIG["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor([500.0]),
        "mask_hidden_states": torch.randn(1, 16, 32, 32, generator=gen),
    }


def base_weight(pipe_dir: Path, name: str) -> torch.Tensor:
    with safe_open(str(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def forward_backward(model: MaskSD3Transformer2DModel, inputs: dict) -> torch.Tensor:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs).sample
    assert out.shape == inputs["hidden_states"].shape == (1, 16, 32, 32)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    loss = (out - target).square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    return loss


def assert_grads_on_exactly_trainable(model: torch.nn.Module) -> None:
    trainable = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
            continue
        trainable += 1
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max().item() > 0, name  # no trained parameter is dead
    assert trainable > 0


def assert_roundtrip(model, mode: str, pretrained: Path, inputs: dict, tmp_path: Path) -> None:
    model.zero_grad(set_to_none=True)
    perturb_trainable(model)
    model.eval()
    meta = {"train_mode": mode, "lora_rank": LORA_RANK, "num_cls": 6, "base_model": str(pretrained)}
    ckpt = save_trained(model, tmp_path / "ckpt", meta=meta)
    stored = load_file(str(ckpt / CHECKPOINT_WEIGHTS))
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert stored.keys() == trained.keys()
    for name, tensor in stored.items():
        assert torch.equal(tensor, trained[name]), name
    del stored

    loaded, loaded_meta = load_trained(ckpt, pretrained=pretrained)
    shutil.rmtree(ckpt)  # 0.8 GB in full mode
    assert loaded_meta["train_mode"] == mode and loaded_meta["lora_rank"] == LORA_RANK
    loaded_named = dict(loaded.named_parameters())
    for name, param in trained.items():
        assert torch.equal(loaded_named[name], param), name
    # Frozen weights come from the saved base, the position table from disk or recomputed: all must agree too.
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name
    with torch.no_grad():
        expected = model(**inputs).sample
        got = loaded(**inputs).sample
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# full mode: image stream + mask branch trained, text stream frozen


class TestFullMode:
    @pytest.fixture(scope="class")
    def full(self, pipe_dir):
        model = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_init="copy")
        counts = configure_training(model, "full", lora_rank=LORA_RANK)
        yield model, counts
        del model
        gc.collect()

    def test_text_stream_frozen_and_counts(self, full):
        model, counts = full
        expected = expected_counts(CONFIG, LORA_RANK)
        named = dict(model.named_parameters())
        frozen = {name for name, param in named.items() if not param.requires_grad}
        assert frozen == {name for name in named if TEXT_STREAM.search(name)}
        assert sum(named[name].numel() for name in frozen) == expected["text"]
        assert counts == {
            "trainable": expected["full_trainable"],
            "frozen": expected["text"],
            "total": expected["total"],
        }
        assert sum(p.numel() for p in named.values()) == expected["total"]
        mask_branch = sum(p.numel() for n, p in named.items() if n.startswith(("mask_embed.", "mask_blocks.")))
        assert mask_branch == expected["mask_branch"]
        # The real widths really are in place.
        block0 = model.transformer.transformer_blocks[0]
        assert block0.use_dual_attention and not block0.context_pre_only
        assert model.transformer.transformer_blocks[LAST].context_pre_only
        assert block0.norm1.linear.weight.shape == (9 * 1536, 1536)
        assert model.transformer.pos_embed.pos_embed.shape == (1, 384 * 384, 1536)
        assert model.mask_embed.pos_embed is None  # the mask tokens read the image's table: no second copy
        assert [name for name, _ in model.named_buffers()] == ["transformer.pos_embed.pos_embed"]

    def test_forward_backward(self, full, inputs):
        model, _ = full
        forward_backward(model, inputs)
        assert_grads_on_exactly_trainable(model)
        for name, param in model.named_parameters():
            if TEXT_STREAM.search(name):
                assert not param.requires_grad and param.grad is None, name

    def test_checkpoint_roundtrip_from_pipeline_folder(self, full, pipe_dir, inputs, tmp_path):
        model, _ = full
        assert_roundtrip(model, "full", pipe_dir, inputs, tmp_path)
        # The perturbation moved the trained base weights, so the equality above needed the checkpoint.
        moved = model.transformer.transformer_blocks[0].attn.to_q.weight
        assert not torch.equal(moved, base_weight(pipe_dir, "transformer_blocks.0.attn.to_q.weight"))


# ---------------------------------------------------------------------------------------------------------
# LoRA mode: LoRA on the image stream, mask branch trained, everything else frozen


class TestLoraMode:
    @pytest.fixture(scope="class")
    def lora(self, pipe_dir, inputs):
        model = MaskSD3Transformer2DModel.from_sd3(pipe_dir, mask_init="copy").eval()
        with torch.no_grad():
            before = model(**inputs).sample
        counts = configure_training(model, "lora", lora_rank=LORA_RANK)
        with torch.no_grad():
            after = model.eval()(**inputs).sample
        yield model, counts, before, after
        del model
        gc.collect()

    def test_adapters_start_as_identity(self, lora):
        _, _, before, after = lora
        assert torch.isfinite(before).all()
        assert torch.equal(before, after)  # LoRA B starts at zero

    def test_lora_targets(self, lora):
        model, _, _, _ = lora
        d = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
        shapes = {"to_q": (d, d), "to_k": (d, d), "to_v": (d, d), "to_out.0": (d, d)}
        per_block = {f"attn.{k}": v for k, v in shapes.items()}
        per_block |= {"ff.net.0.proj": (d, 4 * d), "ff.net.2": (4 * d, d)}
        expected = {}
        for index in range(CONFIG["num_layers"]):
            targets = dict(per_block)
            if index in CONFIG["dual_attention_layers"]:
                targets |= {f"attn2.{k}": v for k, v in shapes.items()}
            expected |= {f"transformer.transformer_blocks.{index}.{k}": v for k, v in targets.items()}
        modules = dict(model.named_modules())
        wrapped = {name for name, module in modules.items() if isinstance(module, LoraLayer)}
        assert wrapped == expected.keys()
        for name, (fan_in, fan_out) in expected.items():
            layer = modules[name]
            assert layer.lora_A["default"].weight.shape == (LORA_RANK, fan_in), name
            assert layer.lora_B["default"].weight.shape == (fan_out, LORA_RANK), name
            assert layer.base_layer.weight.shape == (fan_out, fan_in) and not layer.base_layer.weight.requires_grad

        named = dict(model.named_parameters())
        trainable = {name for name, param in named.items() if param.requires_grad}
        mask_branch = {name for name in named if name.startswith(("mask_embed.", "mask_blocks."))}
        assert mask_branch <= trainable
        assert not any("lora_" in name for name in mask_branch)
        adapters = trainable - mask_branch
        assert adapters == {name for name in named if "lora_" in name}
        assert not any(TEXT_STREAM.search(name) for name in adapters)
        assert {name.split(".lora_")[0] for name in adapters} == expected.keys()

    def test_counts(self, lora):
        model, counts, _, _ = lora
        expected = expected_counts(CONFIG, LORA_RANK)
        lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert lora_params == expected["lora"]
        assert counts == {
            "trainable": expected["lora_trainable"],
            "frozen": expected["total"] - expected["mask_branch"],
            "total": expected["total"] + expected["lora"],
        }

    def test_forward_backward(self, lora, inputs):
        model, _, _, _ = lora
        perturb_trainable(model, seed=3)  # non-zero LoRA B, so LoRA A gets a gradient too
        forward_backward(model, inputs)
        assert_grads_on_exactly_trainable(model)

    def test_checkpoint_roundtrip_from_transformer_folder(self, lora, pipe_dir, inputs, tmp_path):
        model, _, _, _ = lora
        assert_roundtrip(model, "lora", pipe_dir / "transformer", inputs, tmp_path)
        lora_b = model.transformer.transformer_blocks[0].attn2.to_q.lora_B["default"].weight
        assert lora_b.abs().max().item() > 0
