"""Parameter counts and activation memory of crfm's mask model at SD3.5-medium's real dimensions (docs/memory.md).

    .venv/bin/python bench/real_dimensions.py [--skip-activations]

1. Parameters. The whole 24-layer model (SD3.5-medium's transformer config + crfm's mask branch) is built on
   PyTorch's meta device (shapes only: no memory, no time), counted per component, in both training modes
   (`configure_training`), and checked against closed-form formulas. A 3-layer model at real width is built on
   the CPU (block 0 dual attention, block 1 plain joint attention, block 2 the last, context-pre-only one), and
   each block and its `MaskBlock` is counted and checked against the same formulas.
2. Activations (skipped with --skip-activations; ~1-3 min on 2 cores). Each block of that 3-layer model runs
   crfm's `MaskSD3Transformer2DModel._block` with autograd on, and every tensor autograd saves for backward is
   recorded (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded, storages counted once. Run at
   several small token counts, the saved bytes are fitted exactly as a_img*N_img + a_mask*N_mask + a_txt*N_txt + c
   and the fit is checked on a further token count, so nothing quadratic in N (an attention matrix) is stored.
   Two precisions: fp32, and train.py's bf16 setting (frozen weights bf16, trained weights fp32, autocast bf16),
   both in full and in LoRA mode, for a block in the middle of the network (its inputs require grad).
   Measured with the CPU's kernels and the CPU autocast policy; see docs/memory.md for what differs on CUDA.
3. Prints the Markdown tables of docs/memory.md: parameters, the layout change of issue #19 (one position table,
   no query projection in the last mask block) before/after, training state, activations, rough peaks, and which
   mode x optimizer x ZeRO x gradient checkpointing fits a 24, 48 or 80 GB card at 512 and 1024 px (the largest
   batch, from the same arithmetic; `--skip-activations` prints the parameter tables only).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from crfm.models.mmdit import MaskSD3Transformer2DModel  # noqa: E402
from crfm.models.sd35 import SD35_MEDIUM_TRANSFORMER as SD35_MEDIUM  # noqa: E402
from crfm.models.trained_weights import TEXT_BRANCH_KEYS, configure_training  # noqa: E402

D = SD35_MEDIUM["num_attention_heads"] * SD35_MEDIUM["attention_head_dim"]  # 1536
LORA_RANK = 16
TEXT_TOKENS = 77 + 256  # CLIP-L/G + T5, as SD3's prompt encoding
RESOLUTIONS = (512, 1024)
GB = 1e9


# ---------------------------------------------------------------------------------------------------------
# Formulas


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


QK = 2 * SD35_MEDIUM["attention_head_dim"]  # RMSNorm weights of q and k
FF = linear(D, 4 * D) + linear(4 * D, D)  # 8d^2 + 5d
STREAM = linear(D, 6 * D) + 4 * linear(D, D) + QK + FF  # AdaLN-Zero (6 chunks), q/k/v/out, qk-norm, MLP
PRE_ONLY = linear(D, 2 * D) + 3 * linear(D, D) + QK  # AdaLN-continuous (2 chunks), q/k/v, qk-norm
# The last block's mask tokens only give keys/values: no query projection, no q-norm (before issue #19 they had
# both, as PRE_ONLY: trained parameters that never got a gradient).
PRE_ONLY_MASK = linear(D, 2 * D) + 2 * linear(D, D) + QK // 2
DEAD_QUERY = PRE_ONLY - PRE_ONLY_MASK  # 2,360,896
DUAL_ATTN2 = 4 * linear(D, D) + QK  # attn2: q/k/v/out, qk-norm
DUAL_NORM = linear(D, 3 * D)  # the 3 extra AdaLN chunks (shift/scale/gate of attn2) in the dual block's norm1
LORA_BLOCK = LORA_RANK * (4 * 2 * D + 5 * D + 5 * D)  # r*(in+out): q, k, v, out; ff.net.0.proj; ff.net.2
LORA_DUAL = LORA_RANK * 4 * 2 * D
PATCH = SD35_MEDIUM["in_channels"] * SD35_MEDIUM["patch_size"] ** 2 * D + D
FORMULA = {
    # (image stream incl. AdaLN, attn2, text stream, mask block) per block kind
    "dual": (STREAM + DUAL_NORM, DUAL_ATTN2, STREAM, STREAM),
    "plain": (STREAM, 0, STREAM, STREAM),
    "last": (STREAM, 0, PRE_ONLY, PRE_ONLY_MASK),
}
EMBED_FORMULA = {
    "image patch embed (pos_embed.proj)": PATCH,
    "timestep embedder": linear(256, D) + linear(D, D),
    "pooled-text embedder (text_embedder)": linear(SD35_MEDIUM["pooled_projection_dim"], D) + linear(D, D),
    "T5/CLIP context embedder": linear(SD35_MEDIUM["joint_attention_dim"], D),
    "head (norm_out + proj_out)": linear(D, 2 * D) + linear(D, 4 * SD35_MEDIUM["out_channels"]),
    "mask patch embed (mask_embed.proj)": PATCH,
}


def is_text(name: str) -> bool:
    return any(key in name for key in TEXT_BRANCH_KEYS)


def block_components(model: MaskSD3Transformer2DModel, index: int) -> tuple[int, int, int, int]:
    block, mask_block = model.transformer.transformer_blocks[index], model.mask_blocks[index]
    image = attn2 = text = 0
    for name, param in block.named_parameters():
        if name.startswith("attn2."):
            attn2 += param.numel()
        elif is_text(name):
            text += param.numel()
        else:
            image += param.numel()
    return image, attn2, text, sum(p.numel() for p in mask_block.parameters())


def kind_of(model: MaskSD3Transformer2DModel, index: int) -> str:
    block = model.transformer.transformer_blocks[index]
    return "last" if block.context_pre_only else "dual" if block.use_dual_attention else "plain"


# ---------------------------------------------------------------------------------------------------------
# 1. parameters


def full_model_on_meta() -> MaskSD3Transformer2DModel:
    with torch.device("meta"):
        return MaskSD3Transformer2DModel.from_sd3(SD3Transformer2DModel(**SD35_MEDIUM), mask_init="copy")


def parameter_report(small: MaskSD3Transformer2DModel) -> dict:
    model = full_model_on_meta()
    named = dict(model.named_parameters())
    kinds = [kind_of(model, i) for i in range(len(model.mask_blocks))]
    assert kinds == ["dual"] * 13 + ["plain"] * 10 + ["last"], kinds

    # Every block of the 24-layer model and of the real-width CPU model matches the formulas.
    for index, kind in enumerate(kinds):
        assert block_components(model, index) == FORMULA[kind], (index, kind)
    for index in range(len(small.mask_blocks)):
        assert block_components(small, index) == FORMULA[kind_of(small, index)], index
    assert {kind_of(small, i) for i in range(len(small.mask_blocks))} == {"dual", "plain", "last"}

    base = model.transformer
    embeds = {
        "image patch embed (pos_embed.proj)": base.pos_embed,
        "timestep embedder": base.time_text_embed.timestep_embedder,
        "pooled-text embedder (text_embedder)": base.time_text_embed.text_embedder,
        "T5/CLIP context embedder": base.context_embedder,
        "head (norm_out + proj_out)": torch.nn.ModuleList([base.norm_out, base.proj_out]),
        "mask patch embed (mask_embed.proj)": model.mask_embed,
    }
    embed_counts = {key: sum(p.numel() for p in module.parameters()) for key, module in embeds.items()}
    assert embed_counts == EMBED_FORMULA, embed_counts

    totals = {"image": 0, "attn2": 0, "text": 0, "mask": 0}
    for index in range(len(kinds)):
        for key, value in zip(totals, block_components(model, index), strict=True):
            totals[key] += value
    total = sum(p.numel() for p in named.values())
    assert total == sum(totals.values()) + sum(embed_counts.values())
    buffers = {name: b.numel() for name, b in model.named_buffers()}
    assert list(buffers) == ["transformer.pos_embed.pos_embed"], buffers  # one position table, shared

    full, lora = copy.deepcopy(model), copy.deepcopy(model)
    full_counts = configure_training(full, "full")
    with torch.device("meta"):
        lora_counts = configure_training(lora, "lora", LORA_RANK)
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert lora_params == 24 * LORA_BLOCK + 13 * LORA_DUAL
    text_total = totals["text"] + embed_counts["pooled-text embedder (text_embedder)"]
    text_total += embed_counts["T5/CLIP context embedder"]
    mask_total = totals["mask"] + embed_counts["mask patch embed (mask_embed.proj)"]
    assert full_counts["frozen"] == text_total and full_counts["trainable"] == total - text_total
    assert lora_counts["trainable"] == lora_params + mask_total
    # Trained Linear/Conv weights are what autocast casts to bf16 (and caches) in the forward pass.
    cast_full = sum(p.numel() for n, p in full.named_parameters() if p.requires_grad and p.dim() >= 2)
    cast_lora = sum(p.numel() for n, p in lora.named_parameters() if p.requires_grad and p.dim() >= 2)
    trained = {mode: [p for p in m.parameters() if p.requires_grad] for mode, m in (("full", full), ("lora", lora))}
    return {
        "kinds": kinds,
        "per_block": {kind: FORMULA[kind] for kind in ("dual", "plain", "last")},
        "totals": totals,
        "embeds": embed_counts,
        "total": total,
        "base_total": total - mask_total,
        "text_total": text_total,
        "mask_total": mask_total,
        "buffers": buffers,
        "full": full_counts,
        "lora": lora_counts,
        "lora_params": lora_params,
        "cast": {"full": cast_full, "lora": cast_lora},
        "adafactor_state": {mode: adafactor_state(ps) for mode, ps in trained.items()},
        "adamw8bit_state": {mode: adamw8bit_state(ps) for mode, ps in trained.items()},
        "largest_trained": {mode: max(p.numel() for p in ps) for mode, ps in trained.items()},
    }


def adafactor_state(params: list[torch.Tensor]) -> int:
    """Bytes of transformers' Adafactor state (beta1=None, its default: no first moment): per matrix a row and a
    column second moment (shapes [:-1] and [:-2] + [-1:]), per vector a full one; fp32."""
    elements = 0
    for p in params:
        shape = tuple(p.shape)
        elements += math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]) if len(shape) >= 2 else p.numel()
    return 4 * elements


BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256  # bitsandbytes: smaller tensors keep 32-bit state; absmax per block


def adamw8bit_state(params: list[torch.Tensor]) -> float:
    """Bytes of bitsandbytes' AdamW8bit state: two uint8 moments and a float32 absmax per block of each (tensors
    under 4096 elements: two float32 moments)."""
    return sum((2 + 8 / BNB_BLOCK if p.numel() >= BNB_MIN_8BIT_SIZE else 8) * p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------------
# 2. activations


def saved_bytes(model, index: int, tokens: tuple[int, int, int], dtype, autocast: bool, mode: str) -> int:
    """Bytes autograd keeps for backward in one block (parameters excluded, each storage once)."""
    block, mask_block = model.transformer.transformer_blocks[index], model.mask_blocks[index]
    n_img, n_mask, n_txt = tokens
    gen = torch.Generator().manual_seed(0)

    def state(n: int) -> torch.Tensor:
        return torch.randn(1, n, D, generator=gen).to(dtype).requires_grad_(True)

    hidden, mask, context = state(n_img), state(n_mask), state(n_txt)
    # temb requires grad only where the timestep embedder is trained (full mode).
    temb = torch.randn(1, D, generator=gen).to(dtype).requires_grad_(mode == "full")
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    joint = sum(tokens)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
            # SDPA's fused kernels keep q, k, v, out and the log-sum-exp, never the N x N attention matrix.
            assert list(tensor.shape).count(joint) < 2, f"an N x N tensor is saved: {tuple(tensor.shape)}"
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = model._block(block, mask_block, hidden, context, mask, temb)
    assert any(out is not None and out.requires_grad for out in outputs)
    total = sum(seen.values())
    del outputs
    return total


FIT_POINTS = ((48, 48, 16), (96, 48, 16), (48, 96, 16), (48, 48, 48))
CHECK_POINT = (80, 64, 24)


def solve(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """Gauss-Jordan elimination in exact arithmetic."""
    n = len(rows)
    matrix = [row[:] + [value] for row, value in zip(rows, rhs, strict=True)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if matrix[r][col] != 0)
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        for r in range(n):
            if r != col and matrix[r][col] != 0:
                factor = matrix[r][col] / matrix[col][col]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[col], strict=True)]
    return [matrix[i][n] / matrix[i][i] for i in range(n)]


def fit_block(model, index: int, dtype, autocast: bool, mode: str) -> dict:
    measured = [saved_bytes(model, index, point, dtype, autocast, mode) for point in FIT_POINTS]
    rows = [[Fraction(n) for n in point] + [Fraction(1)] for point in FIT_POINTS]
    a_img, a_mask, a_txt, const = solve(rows, [Fraction(m) for m in measured])
    check = saved_bytes(model, index, CHECK_POINT, dtype, autocast, mode)
    predicted = a_img * CHECK_POINT[0] + a_mask * CHECK_POINT[1] + a_txt * CHECK_POINT[2] + const
    assert predicted == check, f"saved bytes not linear in the token counts: {predicted} != {check}"
    return {"img": a_img, "mask": a_mask, "txt": a_txt, "const": const}


def activation_report(small: MaskSD3Transformer2DModel) -> dict:
    report = {}
    for precision in ("fp32", "bf16-autocast"):
        for mode in ("full", "lora"):
            model = copy.deepcopy(small)
            configure_training(model, mode, LORA_RANK)
            if precision == "bf16-autocast":  # what train.py does with --mixed_precision bf16
                for param in model.parameters():
                    if not param.requires_grad:
                        param.data = param.data.to(torch.bfloat16)
                dtype, autocast = torch.bfloat16, True
            else:
                dtype, autocast = torch.float32, False
            for index in range(len(model.mask_blocks)):
                fit = fit_block(model, index, dtype, autocast, mode)
                report[(precision, mode, kind_of(model, index))] = fit
                print(f"  {precision:13s} {mode:4s} {kind_of(model, index):5s}: {format_fit(fit)}", flush=True)
            del model
    return report


def format_fit(fit: dict) -> str:
    per = {k: float(fit[k]) / D for k in ("img", "mask", "txt")}
    return (
        f"bytes/token/d: image {per['img']:.2f}, mask {per['mask']:.2f}, text {per['txt']:.2f}; "
        f"constant {float(fit['const']) / 1e6:.1f} MB"
    )


# ---------------------------------------------------------------------------------------------------------
# 3. tables


def millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M"


def gbytes(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def print_parameter_tables(params: dict) -> None:
    print("\n### Parameters per block (d = 1536)\n")
    print("| block kind (layers) | image stream (AdaLN, attn, MLP) | attn2 | text stream | mask block | block total |")
    print("|---|---:|---:|---:|---:|---:|")
    layers = {"dual": "dual attention (0-12)", "plain": "plain joint (13-22)", "last": "last, context-pre-only (23)"}
    for kind, parts in params["per_block"].items():
        cells = " | ".join(f"{p:,}" for p in parts)
        print(f"| {layers[kind]} | {cells} | {sum(parts):,} |")

    print("\n### Parameters per component, 24 layers\n")
    print("| component | parameters | fp32 | bf16 | trained in full | trained in LoRA r=16 |")
    print("|---|---:|---:|---:|---|---|")
    totals, embeds = params["totals"], params["embeds"]
    rows = [
        ("image stream, 24 blocks (incl. dual AdaLN chunks)", totals["image"], "yes", "LoRA on q/k/v/out, MLP"),
        ("dual attention attn2, 13 blocks", totals["attn2"], "yes", "LoRA on q/k/v/out"),
        ("text stream, 24 blocks", totals["text"], "no", "no"),
        ("mask branch blocks, 24", totals["mask"], "yes", "yes (fully)"),
    ]
    trained_full = {
        "image patch embed (pos_embed.proj)": "yes",
        "timestep embedder": "yes",
        "pooled-text embedder (text_embedder)": "no",
        "T5/CLIP context embedder": "no",
        "head (norm_out + proj_out)": "yes",
        "mask patch embed (mask_embed.proj)": "yes",
    }
    for key, value in embeds.items():
        rows.append((key, value, trained_full[key], "yes (fully)" if key.startswith("mask") else "no"))
    for name, count, in_full, in_lora in rows:
        print(f"| {name} | {count:,} | {gbytes(4 * count)} | {gbytes(2 * count)} | {in_full} | {in_lora} |")
    base, mask, total = params["base_total"], params["mask_total"], params["total"]
    print(f"| **SD3.5-medium transformer (base)** | **{base:,}** | {gbytes(4 * base)} | {gbytes(2 * base)} | | |")
    print(f"| **mask branch (blocks + patch embed)** | **{mask:,}** | {gbytes(4 * mask)} | {gbytes(2 * mask)} | | |")
    print(f"| **mask model total** | **{total:,}** | {gbytes(4 * total)} | {gbytes(2 * total)} | | |")
    lora = params["lora_params"]
    print(f"| LoRA r=16 matrices (LoRA mode only) | {lora:,} | {gbytes(4 * lora)} | {gbytes(2 * lora)} | | |")
    table = params["buffers"]["transformer.pos_embed.pos_embed"]
    cells = f"{table:,} | {gbytes(4 * table)} | {gbytes(2 * table)}"
    print(f"| position table buffer, one, read by image and mask tokens (not trained) | {cells} | | |")
    print_layout_change(params, table)

    print("\n### Training state (train.py: trained fp32, frozen bf16, AdamW fp32 moments)\n")
    print("| | full | LoRA r=16 |")
    print("|---|---:|---:|")
    full, lora_c = params["full"], params["lora"]
    rows = [
        ("trainable parameters", millions(full["trainable"]), millions(lora_c["trainable"])),
        ("frozen parameters", millions(full["frozen"]), millions(lora_c["frozen"])),
        ("trained weights, fp32 (4 B)", gbytes(4 * full["trainable"]), gbytes(4 * lora_c["trainable"])),
        ("frozen weights, bf16 (2 B)", gbytes(2 * full["frozen"]), gbytes(2 * lora_c["frozen"])),
        ("gradients, fp32 (4 B)", gbytes(4 * full["trainable"]), gbytes(4 * lora_c["trainable"])),
        ("AdamW exp_avg + exp_avg_sq, fp32 (8 B)", gbytes(8 * full["trainable"]), gbytes(8 * lora_c["trainable"])),
        ("position table, fp32 (train.py casts parameters only)", gbytes(4 * table), gbytes(4 * table)),
        (
            "autocast bf16 copies of trained weights (forward)",
            gbytes(2 * params["cast"]["full"]),
            gbytes(2 * params["cast"]["lora"]),
        ),
        (
            "foreach-AdamW step transient (sqrt(exp_avg_sq), fp32)",
            gbytes(4 * full["trainable"]),
            gbytes(4 * lora_c["trainable"]),
        ),
    ]
    static = {
        "full": 16 * full["trainable"] + 2 * full["frozen"] + 4 * table,
        "lora": 16 * lora_c["trainable"] + 2 * lora_c["frozen"] + 4 * table,
    }
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    print(f"| **weights + grads + AdamW + table** | **{gbytes(static['full'])}** | **{gbytes(static['lora'])}** |")
    params["static"] = static


def print_layout_change(params: dict, table: int) -> None:
    """Issue #19: the mask embedder's copy of the position table and the last mask block's query projection
    (trained, never reached by a gradient) are gone. 'Before' is this layout plus both."""
    full, lora = params["full"], params["lora"]
    print("\n### Layout change of issue #19, before -> after (SD3.5-medium + mask branch)\n")
    print("| | before | after | difference |")
    print("|---|---:|---:|---:|")
    rows = [
        ("parameters, mask model total", params["total"] + DEAD_QUERY, params["total"]),
        ("trainable, full", full["trainable"] + DEAD_QUERY, full["trainable"]),
        ("trainable, LoRA r=16", lora["trainable"] + DEAD_QUERY, lora["trainable"]),
        ("frozen, full", full["frozen"], full["frozen"]),
        ("frozen, LoRA r=16", lora["frozen"], lora["frozen"]),
        ("position-table elements (buffers)", 2 * table, table),
    ]
    for name, before, after in rows:
        print(f"| {name} | {before:,} | {after:,} | {after - before:+,} |")
    print(f"| position tables, fp32 bytes | {gbytes(8 * table)} | {gbytes(4 * table)} | {gbytes(-4 * table)} |")
    dead = f"{gbytes(16 * DEAD_QUERY)} | 0.00 GB | {gbytes(-16 * DEAD_QUERY)}"
    print(f"| the dead query's weights + grads + AdamW, fp32 (16 B/param) | {dead} |")
    for mode, counts in (("full", full), ("LoRA r=16", lora)):
        # train.py: trained fp32 + grad + AdamW (16 B), frozen bf16 (2 B), tables fp32 (buffers are not cast).
        after = 16 * counts["trainable"] + 2 * counts["frozen"] + 4 * table
        before = after + 16 * DEAD_QUERY + 4 * table
        print(
            f"| training state, {mode} (16 B/trained, 2 B/frozen, 4 B/table element) | "
            f"{gbytes(before)} | {gbytes(after)} | {gbytes(after - before)} |"
        )


def print_activation_tables(params: dict, acts: dict) -> None:
    kinds = params["kinds"]
    counts = {kind: kinds.count(kind) for kind in ("dual", "plain", "last")}
    print("\n### Saved activations per block, measured (bytes per token, in units of d = 1536)\n")
    print("| precision | mode | block | image token | mask token | text token | per-block constant |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (precision, mode, kind), fit in acts.items():
        per = [float(fit[k]) / D for k in ("img", "mask", "txt")]
        print(
            f"| {precision} | {mode} | {kind} | {per[0]:.2f} | {per[1]:.2f} | {per[2]:.2f} | "
            f"{float(fit['const']) / 1e6:.1f} MB |"
        )

    print("\n### Activations for one sample (batch 1), 24 layers\n")
    print(
        "| precision | mode | px | tokens img/mask/text | per dual block | all 24 blocks, no checkpointing | "
        "with checkpointing: 24 block inputs + 1 block recomputed |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    for precision in ("fp32", "bf16-autocast"):
        width = 4 if precision == "fp32" else 2  # bytes of the residual streams kept at block boundaries
        for mode in ("full", "lora"):
            for px in RESOLUTIONS:
                n_img = (px // 16) ** 2
                tokens = {"img": n_img, "mask": n_img, "txt": TEXT_TOKENS}

                def per_block(kind: str, tokens=tokens, precision=precision, mode=mode) -> float:
                    fit = acts[(precision, mode, kind)]
                    return float(sum(fit[k] * n for k, n in tokens.items()))

                total = sum(counts[kind] * per_block(kind) for kind in counts)
                boundary = 24 * (2 * n_img + TEXT_TOKENS) * D * width
                recompute = max(per_block(kind) for kind in counts)
                print(
                    f"| {precision} | {mode} | {px} | {n_img}/{n_img}/{TEXT_TOKENS} | {gbytes(per_block('dual'))} | "
                    f"{gbytes(total)} | {gbytes(boundary)} + {gbytes(recompute)} = {gbytes(boundary + recompute)} |"
                )
    const = {
        mode: sum(counts[kind] * float(acts[("bf16-autocast", mode, kind)]["const"]) for kind in counts)
        for mode in ("full", "lora")
    }
    print(
        f"\nPer-block constants summed over 24 blocks (bf16-autocast): full {gbytes(const['full'])}, "
        f"LoRA {gbytes(const['lora'])} (the bf16 weight copies autocast saves for backward)."
    )

    print("\n### Rough peak for one sample (estimate: bf16-autocast as train.py, CPU-measured activations)\n")
    print(
        "| mode | px | checkpointing | forward/backward: state + weight copies + activations | optimizer step | peak |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for mode in ("full", "lora"):
        static, cast = params["static"][mode], 2 * params["cast"][mode]
        step = static + 4 * params[mode]["trainable"]
        for px in RESOLUTIONS:
            for label, checkpointing in (("no", False), ("yes", True)):
                fwd = static + cast + activation_bytes(params, acts, mode, px, checkpointing)
                print(f"| {mode} | {px} | {label} | {gbytes(fwd)} | {gbytes(step)} | **{gbytes(max(fwd, step))}** |")


def activation_bytes(params: dict, acts: dict, mode: str, px: int, checkpointing: bool, batch: int = 1) -> float:
    """Saved activations of a bf16 training step (measured coefficients, per-block constants excluded: they are
    the autocast weight copies, counted on their own)."""
    kinds = params["kinds"]
    n_img = (px // 16) ** 2
    tokens = {"img": n_img, "mask": n_img, "txt": TEXT_TOKENS}
    per_block = {
        kind: float(sum(acts[("bf16-autocast", mode, kind)][k] * n for k, n in tokens.items())) for kind in set(kinds)
    }
    if checkpointing:  # 24 block inputs (image, mask, text states in bf16) + one block recomputed
        return batch * (len(kinds) * (2 * n_img + TEXT_TOKENS) * D * 2 + max(per_block.values()))
    return batch * sum(per_block[kind] for kind in kinds)


# ---------------------------------------------------------------------------------------------------------
# 4. which set-up fits which card

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
CARDS_GIB = (24, 48, 80)
ZERO_GPUS = 8
# DeepSpeed ZeRO-2's reduce and all-gather buckets (its defaults, 5e8 elements each), bf16.
ZERO_BUCKETS = 2 * 5e8 * 2
# Left of a card for the training step: CUDA context and cuBLAS workspaces (~1.5 GiB), allocator fragmentation
# (~8 %). A guess, not a measurement (no GPU here): bench/gpu_check.py measures the real peaks.
CONTEXT_GIB, USABLE = 1.5, 0.92
MAX_BATCH = 64


def optimizer_bytes(params: dict, mode: str, optimizer: str, zero: bool) -> tuple[float, float]:
    """(state, step transient) of `optimizer` over `mode`'s trained parameters, on one GPU. Under ZeRO the
    optimizer sees flat fp32 partitions: Adafactor's second moment cannot be factored there (4 B/param)."""
    trained = params[mode]["trainable"]
    if optimizer == "adamw":  # two fp32 moments; foreach AdamW's sqrt(exp_avg_sq) copy during the step
        state, transient = 8 * trained, 4 * trained
    elif optimizer == "adamw8bit":  # fused per-tensor kernel: no full-size temporary
        state, transient = params["adamw8bit_state"][mode], 0.0
    elif zero:
        state, transient = 4 * trained, 2 * 4 * trained  # grad^2 and the update, over the flat partition
    else:  # per tensor: grad^2 and the factored update of the largest one
        state, transient = params["adafactor_state"][mode], 2 * 4 * params["largest_trained"][mode]
    shards = ZERO_GPUS if zero else 1
    return state / shards, transient / shards


def peak_bytes(
    params: dict, acts: dict, mode: str, optimizer: str, zero: bool, checkpointing: bool, px: int, batch: int
) -> float:
    """Estimated peak of one GPU for a training step with cached latents (no VAE on the GPU), the larger of the
    forward/backward phase and the optimizer step.

    ZeRO off (train.py, one GPU): trained weights fp32 + fp32 gradients + optimizer state, frozen weights bf16,
    the position table fp32, autocast's bf16 copies of the trained weights. ZeRO-2 over 8 GPUs (DeepSpeed, bf16):
    every weight and the table in bf16 on each GPU, fp32 master weights, fp32 gradients and optimizer state
    sharded 8 ways, the bucket buffers; no autocast copies (the weights already are bf16)."""
    trained, frozen = params[mode]["trainable"], params[mode]["frozen"]
    table = params["buffers"]["transformer.pos_embed.pos_embed"]
    state, transient = optimizer_bytes(params, mode, optimizer, zero)
    if zero:
        static = 2 * (trained + frozen) + 2 * table + (4 + 4) * trained / ZERO_GPUS + state + ZERO_BUCKETS
        copies = 0.0
    else:
        static = (4 + 4) * trained + 2 * frozen + 4 * table + state
        copies = 2 * params["cast"][mode]
    forward = static + copies + activation_bytes(params, acts, mode, px, checkpointing, batch)
    return max(forward, static + transient)


def largest_batch(params: dict, acts: dict, card_gib: int, **setup) -> int:
    budget = card_gib * 2**30 * USABLE - CONTEXT_GIB * 2**30
    fitting = [b for b in range(1, MAX_BATCH + 1) if peak_bytes(params, acts, batch=b, **setup) <= budget]
    return fitting[-1] if fitting else 0


def print_fit_table(params: dict, acts: dict) -> None:
    print(
        f"\n### Largest batch per GPU that fits (estimate; cached latents; ZeRO-2 over {ZERO_GPUS} GPUs; "
        f"usable = {USABLE:.0%} of the card - {CONTEXT_GIB} GiB)\n"
    )
    cards = [f"{px} px, {gib} GB" for px in RESOLUTIONS for gib in CARDS_GIB]
    print(f"| mode | optimizer | ZeRO | grad. ckpt | {' | '.join(cards)} |")
    print("|---|---|---|---|" + "---:|" * len(cards))
    for mode in ("full", "lora"):
        for optimizer in OPTIMIZERS:
            for zero in (False, True):
                for checkpointing in (False, True):
                    setup = {"mode": mode, "optimizer": optimizer, "zero": zero, "checkpointing": checkpointing}
                    cells = []
                    for px in RESOLUTIONS:
                        for gib in CARDS_GIB:
                            batch = largest_batch(params, acts, gib, px=px, **setup)
                            cells.append("-" if batch == 0 else f"{batch}+" if batch == MAX_BATCH else str(batch))
                    zero_cell = f"2 ({ZERO_GPUS} GPUs)" if zero else "off"
                    print(
                        f"| {mode} | {optimizer} | {zero_cell} | {'on' if checkpointing else 'off'} | "
                        f"{' | '.join(cells)} |"
                    )
    print("\nBatch-1 peaks behind the table (GB):\n")
    print("| mode | optimizer | ZeRO | grad. ckpt | 512 px | 1024 px |")
    print("|---|---|---|---|---:|---:|")
    for mode in ("full", "lora"):
        for optimizer in OPTIMIZERS:
            for zero in (False, True):
                for checkpointing in (False, True):
                    setup = {"mode": mode, "optimizer": optimizer, "zero": zero, "checkpointing": checkpointing}
                    peaks = [gbytes(peak_bytes(params, acts, px=px, batch=1, **setup)) for px in RESOLUTIONS]
                    zero_cell = f"2 ({ZERO_GPUS} GPUs)" if zero else "off"
                    print(
                        f"| {mode} | {optimizer} | {zero_cell} | {'on' if checkpointing else 'off'} | "
                        f"{' | '.join(peaks)} |"
                    )


def build_small() -> MaskSD3Transformer2DModel:
    """Real widths, 3 layers: dual (0), plain (1), last (2)."""
    torch.manual_seed(0)
    config = {**SD35_MEDIUM, "num_layers": 3, "dual_attention_layers": (0,)}
    return MaskSD3Transformer2DModel.from_sd3(SD3Transformer2DModel(**config), mask_init="copy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-activations", action="store_true", help="parameter tables only")
    args = parser.parse_args()
    torch.manual_seed(0)
    small = build_small()
    params = parameter_report(small)
    print("parameter formulas: checked (24-layer model on meta; dual, plain and last block at real width on CPU)")
    small.transformer.pos_embed.pos_embed = torch.empty(0)  # the position table (0.9 GB) plays no part in a block
    acts = None if args.skip_activations else activation_report(small)
    print_parameter_tables(params)
    if acts is not None:
        print_activation_tables(params, acts)
        print_fit_table(params, acts)


if __name__ == "__main__":
    main()
