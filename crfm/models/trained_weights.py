"""Training modes (what is trained: full image+mask branches, or LoRA + mask branch) and checkpoints that hold
only the trained weights plus what is needed to rebuild the model around them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crfm.models.conditioning import mask_embed_in_channels, recorded_mask_encoding
from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.utils.constants import TRAIN_MODES
from crfm.utils.errors import reading
from crfm.utils.fileio import atomic_path, read_json, write_text_atomic
from crfm.utils.quiet import NO_FP32_MODULES, quiet

CHECKPOINT_WEIGHTS = "model.safetensors"


CHECKPOINT_META = "crfm_checkpoint.json"


# The exponential moving average of the trained weights (train.py --use_ema): same keys as model.safetensors;
# sampling loads it instead of the last iterate when it is there.
EMA_WEIGHTS = "ema.safetensors"


# Parameters of SD3's text stream (frozen in both training modes). `time_text_embed.text_embedder`
# projects the pooled CLIP vector, so it belongs to the text side too.
TEXT_BRANCH_KEYS = (
    "context_embedder",
    "norm1_context",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.norm_added_q",
    "attn.norm_added_k",
    "attn.to_add_out",
    "norm2_context",
    "ff_context",
    "time_text_embed.text_embedder",
)


# LoRA targets: the image stream's attention (joint and dual) and feed-forward projections.
LORA_TARGETS = (
    r"transformer_blocks\.\d+\.(attn|attn2)\.(to_q|to_k|to_v|to_out\.0)|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"
)


def configure_training(model: MaskSD3Transformer2DModel, mode: str, lora_rank: int = 16) -> dict[str, int]:
    """Freeze/unfreeze (and add LoRA) for `mode`; returns parameter counts.

    full: image stream and mask branch trained, text stream frozen (the paper's best setting).
    lora: LoRA of rank `lora_rank` on the image stream's attention and feed-forward, mask branch trained fully,
    everything else frozen.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {mode!r}")
    if mode == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(not any(key in name for key in TEXT_BRANCH_KEYS))
    else:
        from peft import LoraConfig

        model.requires_grad_(False)
        config = LoraConfig(
            r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
        model.transformer.add_adapter(config)  # marks only the LoRA matrices trainable
        for branch in model.mask_branch():
            branch.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def trained_state_dict(model: MaskSD3Transformer2DModel) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def save_trained(
    model: MaskSD3Transformer2DModel, out_dir: str | Path, meta: dict, ema: torch.nn.Module | None = None
) -> Path:
    """Write only the trained weights (`model.safetensors`), what is needed to rebuild the model (JSON) and, with
    `ema` (diffusers' `EMAModel` over the trained parameters, in their order), their average (`ema.safetensors`,
    its step count in the metadata)."""
    out_dir = Path(out_dir)
    info = {"format": "crfm-mask-mmdit/1", "mask_init": model.config.mask_init, **meta}
    # What the mask branch is trained on comes from the model's own config, where it records it.
    for key in ("mask_encoding", "num_cls"):
        recorded = model.config.get(key)
        if recorded is not None and info.get(key) not in (None, recorded):
            raise ValueError(f"meta says {key} {info[key]!r}, but the model was built for {recorded!r}")
        if recorded is not None:
            info[key] = recorded
    if model.config.get("mask_add"):  # recorded only when on: checkpoints without it are unchanged
        info["mask_add"] = True
    # load_trained rebuilds the mask patch embedding from the recorded encoding: it must be this model's.
    encoding = recorded_mask_encoding(info)
    if mask_embed_in_channels(encoding, info.get("num_cls")) != model.config.mask_in_channels:
        raise ValueError(
            f"meta says mask_encoding {encoding!r} (num_cls {info.get('num_cls')}), but the model's mask branch "
            f"has mask_in_channels={model.config.mask_in_channels}"
        )
    tensors = {name: t.contiguous().cpu() for name, t in trained_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no trainable parameters: call configure_training before save_trained")
    with atomic_path(out_dir / CHECKPOINT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    if ema is not None:
        averaged = {name: p.detach().contiguous().cpu() for name, p in zip(tensors, ema.shadow_params, strict=True)}
        with atomic_path(out_dir / EMA_WEIGHTS) as tmp:
            save_file(averaged, str(tmp), metadata={"optimization_step": str(ema.optimization_step)})
    write_text_atomic(out_dir / CHECKPOINT_META, json.dumps(info, indent=2) + "\n")
    return out_dir


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / CHECKPOINT_META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a crfm checkpoint (written by train.py)")
    return read_json(path, "the checkpoint's record")


def load_ema_state(ema: torch.nn.Module, ckpt_dir: str | Path, names: list[str]) -> None:
    """Restore an `EMAModel` (averages and step count) saved by `save_trained` into `ckpt_dir`; `names` are the
    trained parameters' names in the order the EMA holds them (safetensors keeps names, not order). Keys of an
    earlier layout (`crfm.models.mmdit.LEGACY_KEYS`) are left out."""
    from safetensors import safe_open

    from crfm.models.mmdit import LEGACY_KEYS

    path = Path(ckpt_dir) / EMA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint was saved without --use_ema")
    legacy = re.compile("|".join(LEGACY_KEYS))
    with reading(path, "EMA weights"), safe_open(str(path), framework="pt") as handle:
        stored = {key for key in handle.keys() if key in names or not legacy.search(key)}
        if stored != set(names) or len(names) != len(ema.shadow_params):
            raise ValueError(f"{path}: does not average this run's {len(ema.shadow_params)} trained parameters")
        averaged = [handle.get_tensor(name) for name in names]
        step = int(handle.metadata()["optimization_step"])
    for shadow, saved in zip(ema.shadow_params, averaged, strict=True):
        shadow.data.copy_(saved)
    ema.optimization_step = step


def load_trained_weights(
    model: MaskSD3Transformer2DModel,
    weights_or_dir: Mapping[str, torch.Tensor] | str | Path,
    target: str = "this model",
    use_ema: bool = False,
) -> MaskSD3Transformer2DModel:
    """Load trained weights (a state dict, or a checkpoint folder's `model.safetensors`; with `use_ema` its
    `ema.safetensors` when there is one) into `model`.

    `model` must already be configured for training (`configure_training`), so that its trainable parameters
    are exactly the checkpoint's tensors: any missing, unexpected or reshaped key raises a ValueError naming
    them (`target` describes the model in that message, e.g. its base and training mode). Keys of an earlier
    layout that never changed an output are left out (`MaskSD3Transformer2DModel.drop_legacy_keys`). Frozen
    weights are left as they are. Returns `model`.
    """
    if isinstance(weights_or_dir, Mapping):
        weights, source = dict(weights_or_dir), "weights"
    else:
        path = Path(weights_or_dir) / CHECKPOINT_WEIGHTS
        if use_ema and (Path(weights_or_dir) / EMA_WEIGHTS).is_file():
            path = Path(weights_or_dir) / EMA_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a crfm checkpoint (written by train.py)")
        averaged = " (its EMA weights)" if path.name == EMA_WEIGHTS else ""
        with reading(path, "EMA weights" if path.name == EMA_WEIGHTS else "trained weights"):
            weights = load_file(str(path))
        source = f"checkpoint {weights_or_dir}{averaged}"
    weights = model.drop_legacy_keys(weights)
    expected = trained_state_dict(model)
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    resized = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or unexpected or resized:
        raise ValueError(
            f"{source} does not fit {target}: {len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:2]}), {len(resized)} of another shape (e.g. {resized[:2]})"
        )
    model.load_state_dict(weights, strict=False)
    return model


def load_trained(
    ckpt_dir: str | Path,
    pretrained: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[MaskSD3Transformer2DModel, dict]:
    """Rebuild base + mask branch (+ LoRA, + the mask patch embedding for the checkpoint's mask encoding) and
    load the trained weights (their EMA when the checkpoint has one); returns (model, checkpoint meta)."""
    meta = read_checkpoint_meta(ckpt_dir)
    base = pretrained if pretrained is not None else meta["base_model"]
    # The checkpoint's record (num_cls, mask encoding; grey before it was kept) goes into the model's config.
    model = MaskSD3Transformer2DModel.from_sd3(
        base, mask_init=meta.get("mask_init", "copy"), mask_encoding=recorded_mask_encoding(meta),
        num_cls=meta.get("num_cls"), mask_add=bool(meta.get("mask_add")),
    )  # fmt: skip
    configure_training(model, meta["train_mode"], meta.get("lora_rank", 16))
    load_trained_weights(model, ckpt_dir, target=f"{base} in mode {meta['train_mode']}", use_ema=True)
    model.requires_grad_(False).eval()
    with quiet(*NO_FP32_MODULES):  # diffusers lists the modules to keep in fp32 on every cast; ours are none
        return (model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)), meta
