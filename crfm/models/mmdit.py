"""SD3's MM-DiT with a mask branch: text, image and mask tokens in one joint attention per block.

The mask (a class-index map) is encoded by `crfm.models.conditioning` (VAE latents, or one-hot class fractions
with `mask_in_channels` = num_cls channels), patch-embedded by the branch's own projection plus the image's
position table (one table, shared, never copied: 0.9 GB in fp32 at SD3.5 size), and carried through every block
with the branch's own AdaLN-Zero modulation, q/k/v/out projections (with the block's qk-norm) and feed-forward.
Only image tokens reach the output head. Without a mask the forward pass *is* diffusers' `SD3Transformer2DModel`.

Weights saved before two layout changes still load: the mask embedder once held its own copy of the position table
(`mask_embed.pos_embed`), and the last block's mask stream once had a query projection whose output was dropped
(`mask_blocks.<last>.to_q.*`, `.norm_q.*`). `LEGACY_KEYS` names them; `from_pretrained` and `drop_legacy_keys`
leave them out.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward, JointTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from torch import nn

from crfm.models.conditioning import mask_embed_in_channels
from crfm.utils.constants import MASK_INITS

# Keys of weights saved by earlier layouts that this one has no parameter or buffer for (see the module docstring).
LEGACY_KEYS = (r"^mask_embed\.pos_embed$", r"^mask_blocks\.\d+\.(to_q|norm_q)\.")


class MaskBlock(nn.Module):
    """The mask stream of one MM-DiT block (same shapes as the image stream's joint-attention part)."""

    def __init__(self, block: JointTransformerBlock) -> None:
        super().__init__()
        dim = block.norm2.normalized_shape[0]
        self.heads = block.attn.heads
        # In the last block the mask tokens only feed keys/values to the image tokens (like the text stream), so
        # it has no query projection (it would be a trained weight that no gradient ever reaches).
        self.pre_only = block.context_pre_only
        if self.pre_only:
            self.norm1 = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, bias=True)
        else:
            self.norm1 = AdaLayerNormZero(dim)
        self.to_q = _unused_query(dim) if self.pre_only else nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # The block's qk-norm (RMSNorm for SD3.5, None for SD3).
        self.norm_q = None if self.pre_only else copy.deepcopy(block.attn.norm_q)
        self.norm_k = copy.deepcopy(block.attn.norm_k)
        if not self.pre_only:
            self.to_out = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def copy_from_image_stream(self, block: JointTransformerBlock) -> None:
        """Start from the pretrained image stream, which already maps VAE latents to useful tokens."""
        with torch.no_grad():
            dim = self.to_k.in_features
            source = block.norm1.linear  # 6*dim rows (AdaLayerNormZero) or 9*dim (SD3.5 dual attention)
            if self.pre_only:
                # AdaLayerNormContinuous chunks (scale, shift); AdaLayerNormZero starts (shift, scale, ...).
                rows = torch.cat([torch.arange(dim, 2 * dim), torch.arange(0, dim)])
            else:
                rows = torch.arange(6 * dim)  # shift/scale/gate for attention and MLP; drops attn2's chunks
            self.norm1.linear.weight.copy_(source.weight[rows])
            self.norm1.linear.bias.copy_(source.bias[rows])
            for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k"):
                if getattr(self, name) is not None:
                    getattr(self, name).load_state_dict(getattr(block.attn, name).state_dict())
            if not self.pre_only:
                self.to_out.load_state_dict(block.attn.to_out[0].state_dict())
                self.ff.load_state_dict(block.ff.state_dict())

    def reset_fresh(self) -> None:
        """Default layer init, with the AdaLN modulation zeroed as in DiT (gates start closed)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            if module is self.norm1.linear and self.pre_only:
                _unused_query(module.in_features)
        nn.init.zeros_(self.norm1.linear.weight)
        nn.init.zeros_(self.norm1.linear.bias)
        for norm in (self.norm_q, self.norm_k):
            if norm is not None and getattr(norm, "weight", None) is not None:
                nn.init.ones_(norm.weight)

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _project_heads(hidden, self.heads, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)


def _unused_query(dim: int) -> None:
    """Where a pre-only mask block once built its query projection: draw (and drop) that layer's initial values,
    so that a seed still initialises everything built after it (later blocks, LoRA, a fresh branch) as before."""
    nn.Linear(dim, dim)


def _heads(proj: nn.Module, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    return proj(hidden).view(hidden.shape[0], -1, heads, proj.out_features // heads).transpose(1, 2)


def _project_heads(
    hidden: torch.Tensor, heads: int, to_q: nn.Module | None, to_k: nn.Module, to_v: nn.Module, norm_q, norm_k
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token states [B, N, D] -> per-head query, key, value [B, heads, N, D/heads], with the optional qk-norm.

    Without `to_q` (tokens that only give keys and values) the query rows are zeros: their attention output is
    dropped, and placeholder rows keep the joint attention's shape, so every other row is computed exactly as
    with a real query (a fused kernel treats query rows independently)."""
    key, value = _heads(to_k, hidden, heads), _heads(to_v, hidden, heads)
    if norm_k is not None:
        key = norm_k(key)
    if to_q is None:
        return torch.zeros_like(key), key, value
    query = _heads(to_q, hidden, heads)
    return (query if norm_q is None else norm_q(query)), key, value


def _image_qkv(block: JointTransformerBlock, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn = block.attn
    return _project_heads(hidden, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)


def _text_qkv(block: JointTransformerBlock, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn = block.attn
    return _project_heads(
        hidden, attn.heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k
    )


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, use_xformers: bool) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]."""
    if use_xformers:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.flatten(2)
    out = F.scaled_dot_product_attention(query, key, value)
    return out.transpose(1, 2).flatten(2)


class MaskSD3Transformer2DModel(ModelMixin, ConfigMixin):
    """`SD3Transformer2DModel` plus a mask branch; see the module docstring.

    Build from a pretrained SD3/SD3.5 transformer with `from_sd3`; save and reload the whole model with
    `save_pretrained`/`from_pretrained`, or only the trained weights with `save_trained`/`load_trained`.
    """

    _supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected = list(LEGACY_KEYS)
    ignore_for_config = ["transformer"]

    @register_to_config
    def __init__(
        self,
        transformer_config: dict,
        mask_init: str = "copy",
        transformer: SD3Transformer2DModel | None = None,
        mask_in_channels: int | None = None,
        mask_encoding: str | None = None,
        num_cls: int | None = None,
        mask_add: bool = False,
    ) -> None:
        """`mask_encoding`, `num_cls`: what the mask branch is trained on, kept in the config (and so in every
        checkpoint: `save_trained` records them) and checked by `crfm.models.conditioning.check_mask_inputs`; the
        encoding gives `mask_in_channels`. Without them (configs from before they were kept) `mask_in_channels`
        says it alone: channels of a mask condition that is *not* in the image latents' space (one-hot class
        fractions: num_cls); None (the default) for VAE-encoded masks with the latents' channels.

        `mask_add`: also add each mask token, through a zero-initialised projection (`mask_add_proj`), to the image
        token at its position before the first block. The joint attention (the paper's design) must *learn* which
        mask token lies under which image token; the addition gives that correspondence from the start, as extra
        input channels do in inpainting models. At initialisation it changes nothing."""
        super().__init__()
        if mask_init not in MASK_INITS:
            raise ValueError(f"mask_init must be one of {MASK_INITS}, got {mask_init!r}")
        if mask_encoding is not None:
            channels = mask_embed_in_channels(mask_encoding, num_cls)
            if mask_in_channels not in (None, channels):
                raise ValueError(
                    f"mask_in_channels={mask_in_channels} does not fit mask_encoding {mask_encoding!r} "
                    f"(num_cls {num_cls}): it takes {channels}"
                )
            mask_in_channels = channels
            self.register_to_config(mask_in_channels=channels)
        if mask_in_channels is not None and mask_in_channels < 1:
            raise ValueError(f"mask_in_channels must be positive or None, got {mask_in_channels}")
        if transformer is None:
            init_args = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
            transformer = SD3Transformer2DModel(**init_args)
        self.transformer = transformer
        cfg = transformer.config
        if cfg.pos_embed_max_size is None:
            raise ValueError("the mask branch reads the image's cropped position table: pos_embed_max_size is needed")
        # The projection only: mask tokens take their positions from the image's table (`_mask_tokens`).
        self.mask_embed = PatchEmbed(
            height=cfg.sample_size,
            width=cfg.sample_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels if mask_in_channels is None else mask_in_channels,
            embed_dim=transformer.inner_dim,
            pos_embed_type=None,
            pos_embed_max_size=cfg.pos_embed_max_size,
        )
        self.mask_blocks = nn.ModuleList(MaskBlock(block) for block in transformer.transformer_blocks)
        self.mask_add_proj = nn.Linear(transformer.inner_dim, transformer.inner_dim) if mask_add else None
        self.gradient_checkpointing = False
        self.use_xformers = False
        self.init_mask_branch(mask_init)

    @classmethod
    def from_sd3(
        cls,
        transformer: SD3Transformer2DModel | str | Path,
        mask_init: str = "copy",
        mask_in_channels: int | None = None,
        mask_encoding: str | None = None,
        num_cls: int | None = None,
        mask_add: bool = False,
        **load_kwargs,
    ) -> MaskSD3Transformer2DModel:
        """Wrap a pretrained transformer (or load one from `<pipeline>/transformer`) and add the mask branch.

        `mask_encoding` and `num_cls`: what the branch is trained on (see `__init__`); `mask_in_channels` alone: the
        branch's input channels, for a model that does not record them; `mask_add`: see `__init__`."""
        if not isinstance(transformer, SD3Transformer2DModel):
            path = Path(transformer)
            subfolder = "transformer" if (path / "transformer" / "config.json").is_file() else None
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder=subfolder, **load_kwargs)
        # Private keys ("_name_or_path" may be a Path) are not part of the architecture and not JSON-safe.
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        model = cls(
            transformer_config=config, mask_init=mask_init, transformer=transformer, mask_in_channels=mask_in_channels,
            mask_encoding=mask_encoding, num_cls=num_cls, mask_add=mask_add,
        )  # fmt: skip
        # Only the new branch needs moving; the wrapped transformer keeps its own placement and dtype.
        for branch in model.mask_branch():
            branch.to(device=transformer.device, dtype=transformer.dtype)
        return model

    def mask_branch(self) -> list[nn.Module]:
        """The modules this class adds to SD3's transformer (trained in every mode, frozen by --no_mask)."""
        return [self.mask_embed, self.mask_blocks, *([self.mask_add_proj] if self.mask_add_proj is not None else [])]

    @property
    def mask_channels(self) -> int:
        """Channels the mask condition must have (`mask_hidden_states` [B, mask_channels, H, W])."""
        in_channels = self.config.mask_in_channels
        return self.transformer.config.in_channels if in_channels is None else in_channels

    def init_mask_branch(self, mask_init: str) -> None:
        if mask_init == "copy":
            # One-hot fractions are not VAE latents: the image's projection reads another input space (with
            # another channel count), so the mask's then keeps its default init.
            if self.config.mask_in_channels is None:
                self.mask_embed.proj.load_state_dict(self.transformer.pos_embed.proj.state_dict())
            for mask_block, block in zip(self.mask_blocks, self.transformer.transformer_blocks, strict=True):
                mask_block.copy_from_image_stream(block)
        else:
            self.mask_embed.proj.reset_parameters()
            for mask_block in self.mask_blocks:
                mask_block.reset_fresh()
        if self.mask_add_proj is not None:  # zero: the addition starts as no change to the pretrained model
            nn.init.zeros_(self.mask_add_proj.weight)
            nn.init.zeros_(self.mask_add_proj.bias)

    def drop_legacy_keys(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights` without the keys of earlier layouts that this model has nothing for (`LEGACY_KEYS`): neither
        ever changed an output, so old checkpoints load to the same model."""
        own = self.state_dict().keys()
        legacy = re.compile("|".join(LEGACY_KEYS))
        return {key: value for key, value in weights.items() if key in own or not legacy.search(key)}

    def _mask_tokens(self, mask_hidden_states: torch.Tensor) -> torch.Tensor:
        """The mask's patch projection plus the image's position table: `PatchEmbed.forward`'s arithmetic."""
        tokens = self.mask_embed(mask_hidden_states)
        positions = self.transformer.pos_embed.cropped_pos_embed(*mask_hidden_states.shape[-2:])
        return (tokens + positions).to(tokens.dtype)

    def enable_xformers(self, enabled: bool = True) -> None:
        if enabled:
            import xformers.ops  # noqa: F401  (fail now, not mid-training)
        self.use_xformers = enabled
        if enabled:
            self.transformer.enable_xformers_memory_efficient_attention()
        else:
            self.transformer.disable_xformers_memory_efficient_attention()

    def _block(
        self,
        block: JointTransformerBlock,
        mask_block: MaskBlock,
        hidden: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        temb: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """One block with the three streams; the same arithmetic as diffusers' JointTransformerBlock."""
        if block.use_dual_attention:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_x2, gate_msa2 = block.norm1(hidden, emb=temb)
        else:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
        if block.context_pre_only:
            norm_c = block.norm1_context(context, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(context, emb=temb)
        if mask_block.pre_only:
            norm_m = mask_block.norm1(mask, temb)
        else:
            norm_m, m_gate_msa, m_shift_mlp, m_scale_mlp, m_gate_mlp = mask_block.norm1(mask, emb=temb)

        streams = (_image_qkv(block, norm_x), _text_qkv(block, norm_c), mask_block.qkv(norm_m))
        query, key, value = (torch.cat(parts, dim=2) for parts in zip(*streams, strict=True))
        joint = _attention(query, key, value, self.use_xformers).to(query.dtype)
        attn_x, attn_c, attn_m = joint.split([norm_x.shape[1], norm_c.shape[1], norm_m.shape[1]], dim=1)

        hidden = hidden + gate_msa.unsqueeze(1) * block.attn.to_out[1](block.attn.to_out[0](attn_x))
        if block.use_dual_attention:
            hidden = hidden + gate_msa2.unsqueeze(1) * block.attn2(hidden_states=norm_x2)
        normed = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden = hidden + gate_mlp.unsqueeze(1) * block.ff(normed)

        if block.context_pre_only:
            context = None
        else:
            context = context + c_gate_msa.unsqueeze(1) * block.attn.to_add_out(attn_c)
            normed = block.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            context = context + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)

        if mask_block.pre_only:
            mask = None
        else:
            mask = mask + m_gate_msa.unsqueeze(1) * mask_block.to_out(attn_m)
            # The mask stream's feed-forward uses the mask stream's own modulation.
            normed = mask_block.norm2(mask) * (1 + m_scale_mlp[:, None]) + m_shift_mlp[:, None]
            mask = mask + m_gate_mlp.unsqueeze(1) * mask_block.ff(normed)
        return context, hidden, mask

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        mask_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Velocity for latents `hidden_states` [B, C, H, W] given text and, optionally, the mask condition
        [B, `mask_channels`, H, W]."""
        base = self.transformer
        if mask_hidden_states is None:
            return base(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                return_dict=return_dict,
            )
        batch, _, *size = hidden_states.shape
        expected = (batch, self.mask_channels, *size)
        if tuple(mask_hidden_states.shape) != expected:
            raise ValueError(
                f"mask latents {tuple(mask_hidden_states.shape)} do not fit latents {tuple(hidden_states.shape)}: "
                f"expected {expected} (batch, the model's {self.mask_channels} mask channels, latent height, width)"
            )
        height, width = hidden_states.shape[-2:]
        hidden = base.pos_embed(hidden_states).contiguous()
        mask = self._mask_tokens(mask_hidden_states).contiguous()
        if self.mask_add_proj is not None:
            hidden = hidden + self.mask_add_proj(mask)
        temb = base.time_text_embed(timestep, pooled_projections)
        context = base.context_embedder(encoder_hidden_states)
        for block, mask_block in zip(base.transformer_blocks, self.mask_blocks, strict=True):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, hidden, mask = self._gradient_checkpointing_func(
                    self._block, block, mask_block, hidden, context, mask, temb
                )
            else:
                context, hidden, mask = self._block(block, mask_block, hidden, context, mask, temb)

        hidden = base.proj_out(base.norm_out(hidden, temb))
        patch, channels = base.config.patch_size, base.out_channels
        hidden = hidden.reshape(hidden.shape[0], height // patch, width // patch, patch, patch, channels)
        output = torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], channels, height, width)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
