"""Frozen mmsegmentation segmentors for CRFM guidance and judging: a differentiable adapter from generated
images to per-class logits, built from an mmseg config and a safely loaded checkpoint."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crfm.segmentation.safe_load import _extract_state_dict, load_checkpoint_file


class SegmentorAdapter(nn.Module):
    """Frozen segmentor as `images -> logits`, differentiable w.r.t. the images.

    Input: float [B, 3, H, W] RGB in [-1, 1] (the VAE decoder's range; values outside are not clamped, so
    gradients never vanish). Output: per-class logits [B, num_classes, H, W] at the input resolution.

    The adapter maps the images to [0, `scale`], puts the channels in the order the network was trained on,
    and normalises with the network's mean/std (given in that order):

    - mmseg models (`from_mmseg`): mmseg's `LoadImageFromFile` decodes to BGR, and `SegDataPreProcessor`
      swaps channels when `bgr_to_rgb` (or `rgb_to_bgr`) is set *before* subtracting its mean. So a model
      with the swap saw RGB and gets our RGB as is; one without saw BGR and gets our channels reversed.
      `scale` is 255, mean/std are the preprocessor's. Logits come from the model's own `inference` (whole
      or slide, per its `test_cfg`), resized to the input size by the decode head.
    - any other network (the constructor): `model(normalised images)` must return logits [B, num_classes, h, w];
      they are bilinearly resized to (H, W) if needed. Pass `channel_order="bgr"` for a BGR-trained
      network and `scale=1.0` for mean/std on a [0, 1] scale (torchvision style).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        channel_order: str = "rgb",
        scale: float = 255.0,
        logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values, got {list(mean)} and {list(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        self.class_names: list[str] = names
        self.channel_order = channel_order
        self.scale = float(scale)
        self._logits_fn = logits_fn
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_mmseg(cls, model: nn.Module) -> SegmentorAdapter:
        """Adapter for an mmseg segmentor (`EncoderDecoder` & co), using its data_preprocessor settings."""
        pre = model.data_preprocessor
        if getattr(pre, "_enable_normalize", False):
            mean, std = pre.mean.flatten().tolist(), pre.std.flatten().tolist()
        else:
            mean, std = [0.0] * 3, [1.0] * 3
        # The loader gives BGR; one swap in the preprocessor means the network saw RGB (see class docstring).
        order = "rgb" if getattr(pre, "channel_conversion", False) else "bgr"
        head = model.decode_head
        num_classes = int(head.num_classes)
        meta = getattr(model, "dataset_meta", None) or {}
        names = meta.get("classes")
        if names is not None and len(names) != num_classes:
            names = None  # a mismatch is reported by load_segmentor; here just fall back to numbers
        return cls(model, mean, std, num_classes, names, order, 255.0, logits_fn=_mmseg_logits_fn(model))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> the network's input: [0, scale], its channel order, (x - mean) / std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = (images.float() + 1.0) * (self.scale / 2.0)
        if self.channel_order == "bgr":
            x = x.flip(1)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images)
        logits = self._logits_fn(x) if self._logits_fn is not None else self.model(x)
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"segmentor returned {tuple(logits.shape)}, expected [B, {self.num_classes}, h, w]")
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def train(self, mode: bool = True) -> SegmentorAdapter:
        # Frozen: dropout / BN statistics must never switch to training behaviour under guidance.
        return super().train(False)


def _mmseg_logits_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised batch -> logits via the segmentor's own inference path, with the metas it reads."""
    binary = int(getattr(model.decode_head, "out_channels", model.decode_head.num_classes)) == 1

    def logits(x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[-2:])
        # Fresh dicts per call: slide inference writes into batch_img_metas[0].
        metas = [{"ori_shape": shape, "img_shape": shape, "pad_shape": shape} for _ in range(x.shape[0])]
        infer = getattr(model, "inference", None) or model.encode_decode
        out = infer(x, metas)
        if binary:
            # A sigmoid head (out_channels=1): [0, z] gives softmax == sigmoid, so cross-entropy still works.
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        return out

    return logits


def _check_state_dict_keys(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"

        raise ValueError(
            f"checkpoint {path} does not match the config's model: "
            f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}"
        )


def load_segmentor(
    config: str | Path,
    checkpoint: str | Path | None,
    device: str | torch.device = "cpu",
    num_cls: int | None = None,
) -> SegmentorAdapter:
    """Build the mmseg model of `config`, load `checkpoint` strictly (read weights-only by `load_checkpoint_file`,
    never running pickled code), freeze it.

    `num_cls`, when given, must equal the model's number of classes (and that of the checkpoint's
    dataset_meta, if it names classes); otherwise ValueError naming both numbers.
    """
    from mmengine.runner import load_state_dict
    from mmseg.apis import init_model

    if not Path(config).is_file():  # mmengine's own message names no file first
        raise FileNotFoundError(errno.ENOENT, "no such mmseg config", str(config))
    model = init_model(str(config), checkpoint=None, device=str(device))
    if checkpoint is not None:
        obj = load_checkpoint_file(checkpoint)
        state = _extract_state_dict(obj, checkpoint)
        _check_state_dict_keys(model, state, checkpoint)
        load_state_dict(model, state, strict=True)  # strict also catches shape mismatches
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        if isinstance(meta.get("dataset_meta"), dict):
            model.dataset_meta = meta["dataset_meta"]
    model_classes = int(model.decode_head.num_classes)
    meta_classes = (getattr(model, "dataset_meta", None) or {}).get("classes")
    if meta_classes is not None and len(meta_classes) != model_classes:
        raise ValueError(
            f"checkpoint dataset_meta names {len(meta_classes)} classes but decode_head.num_classes={model_classes}"
        )
    if num_cls is not None and num_cls != model_classes:
        raise ValueError(
            f"--num_cls: num_cls={num_cls} differs from the segmentor's {model_classes} classes ({config})"
        )
    adapter = SegmentorAdapter.from_mmseg(model)
    return adapter.to(device)
