"""Text encoding with SD3's three encoders, and the on-disk store of prompt vectors.

Prompts are encoded once, ahead of training and sampling, exactly as diffusers'
`StableDiffusion3Pipeline.encode_prompt` does (we call it): CLIP-L and CLIP-G penultimate hidden
states concatenated and zero-padded to the T5 width, T5 tokens appended along the sequence; pooled
= both CLIP projections. Vectors of item `i` of an index live in `<vectors_dir>/<i>.safetensors`
(`prompt_embeds` [seq, dim], `pooled_prompt_embeds` [dim], no batch axis); the empty prompt used
for classifier-free guidance lives in `<vectors_dir>/empty.safetensors`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crfm.data import DatasetError, IndexItem, read_index
from crfm.fileio import atomic_path, remove_stale_temporaries, write_jsonl_atomic, write_text_atomic

VECTOR_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
EMPTY_PROMPT_FILE = "empty.safetensors"
SETTINGS_FILE = "vectors.json"
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | int | None) -> torch.device:
    """Accept the original scripts' integer GPU index as well as 'cpu', 'cuda', 'cuda:1'."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) or str(device).isdigit():
        return torch.device(f"cuda:{int(device)}")
    return torch.device(device)


def load_text_encoders(pretrained: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the pipeline's tokenizers and text encoders only (no transformer or VAE weights).

    Returns a `StableDiffusion3Pipeline` so that `encode_prompt` is diffusers' own code.
    """
    from diffusers import StableDiffusion3Pipeline

    pretrained = Path(pretrained)
    model_index = pretrained / "model_index.json"
    if not model_index.is_file():
        raise FileNotFoundError(
            f"{pretrained} is not a diffusers pipeline directory (no model_index.json). Download SD3.5 with "
            "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir ./sd3.5_medium`, "
            "or build a tiny offline one with `python -m crfm.tiny DIR`."
        )
    components = json.loads(model_index.read_text())
    # Components saved as null (e.g. SD3 without T5) must be passed as None explicitly to diffusers.
    skipped: dict = {name: None for name, spec in components.items() if isinstance(spec, list) and spec[0] is None}
    skipped["vae"] = None
    # Without T5, diffusers sizes the zero T5 block from the transformer config, so keep it then.
    if "text_encoder_3" not in skipped:
        skipped["transformer"] = None
    pipe = StableDiffusion3Pipeline.from_pretrained(pretrained, dtype=dtype, **skipped)
    return pipe.to(device)


@torch.no_grad()
def encode_prompts(
    pipe, prompts: Sequence[str], max_sequence_length: int = 256, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-encode prompts with diffusers' `encode_prompt`; returns ([B, seq, dim], [B, pooled_dim])."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts),
        prompt_2=None,
        prompt_3=None,
        device=torch.device(device) if device is not None else pipe.text_encoder.device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled


def item_vector_path(vectors_dir: str | Path, position: int) -> Path:
    return Path(vectors_dir) / f"{position}.safetensors"


def save_vectors(path: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor, prompt: str) -> None:
    """Write one item's vectors atomically; the prompt goes in the header so re-runs can detect edits."""
    tensors = {"prompt_embeds": prompt_embeds.contiguous().cpu(), "pooled_prompt_embeds": pooled.contiguous().cpu()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"prompt": prompt})


def stored_prompt(path: str | Path) -> str | None:
    """The prompt recorded in a vector file's header, or None if the file is absent or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if set(VECTOR_KEYS) - set(handle.keys()):
                return None
            return (handle.metadata() or {}).get("prompt")
    except Exception:  # missing, truncated or foreign file: safetensors raises its own error types
        return None


def load_vectors(path: str | Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    # Copies, not views of the memory-mapped file: a file damaged or rewritten later can't fault them.
    return {key: tensors[key].clone() for key in VECTOR_KEYS}


def load_item_vectors(vectors_dir: str | Path, item: IndexItem) -> dict[str, torch.Tensor]:
    """Vectors of one index item; the index must be the one written by vectorize (it has `index`)."""
    if "index" not in item.record:
        raise DatasetError(
            f"item {item.where()}: no 'index' field. Use the index written by preprocess/vectorize.py "
            "(its --out_json_file), whose 'index' names the vector file."
        )
    path = item_vector_path(vectors_dir, int(item.record["index"]))
    if not path.is_file():
        raise DatasetError(
            f"item {item.where()}: vector file {path} is missing. Run preprocess/vectorize.py on this index "
            f"with --work_dir {vectors_dir} first."
        )
    return load_vectors(path)


def load_empty_prompt_vectors(vectors_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(vectors_dir) / EMPTY_PROMPT_FILE
    if not path.is_file():
        raise DatasetError(f"{path} is missing: run preprocess/vectorize.py (it encodes the empty prompt once)")
    return load_vectors(path)


@dataclass
class VectorizeReport:
    items: int
    encoded_items: int
    skipped_items: int
    encoded_prompts: int  # distinct prompts sent through the encoders
    seconds: float  # whole call, model loading included
    encode_seconds: float  # encoding and writing only
    out_index: Path
    vectors_dir: Path

    @property
    def prompts_per_second(self) -> float:
        return self.encoded_prompts / self.encode_seconds if self.encode_seconds > 0 else float("nan")


def _check_settings(vectors_dir: Path, settings: dict, overwrite: bool) -> None:
    path = vectors_dir / SETTINGS_FILE
    if overwrite or not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
    if changed:
        detail = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise DatasetError(
            f"{vectors_dir} holds vectors made with other settings ({detail}). "
            "Use another --work_dir, or --overwrite to re-encode everything."
        )


def vectorize_index(
    pretrained: str | Path,
    index_file: str | Path,
    out_index: str | Path,
    vectors_dir: str | Path,
    data_root: str | Path | None = None,
    max_sequence_length: int = 256,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> VectorizeReport:
    """Encode every prompt of an index into per-item safetensors; resumable and validating.

    The whole index is validated first (nothing is written on a bad line). Items whose file already
    holds vectors of the same prompt are skipped, so a killed run resumes where it stopped.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    items = read_index(index_file, data_root)
    vectors_dir = Path(vectors_dir)
    settings = {
        "pretrained_model_name_or_path": str(Path(pretrained).resolve()),
        "max_sequence_length": max_sequence_length,
        "dtype": str(dtype).removeprefix("torch."),
    }
    _check_settings(vectors_dir, settings, overwrite)
    remove_stale_temporaries(vectors_dir)
    # Recorded before any vector is written, so files in this folder always match these settings.
    write_text_atomic(vectors_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")

    empty_path = vectors_dir / EMPTY_PROMPT_FILE
    pending: dict[str, list[int]] = {}  # prompt -> positions still to write
    for position, item in enumerate(items):
        path = item_vector_path(vectors_dir, position)
        if overwrite or stored_prompt(path) != item.prompt:
            pending.setdefault(item.prompt, []).append(position)
    if overwrite or stored_prompt(empty_path) != "":
        pending.setdefault("", []).append(-1)  # -1: the empty-prompt file

    encoded_items = sum(len(v) for v in pending.values()) - (1 if -1 in pending.get("", []) else 0)
    encode_seconds = 0.0
    if pending:
        pipe = load_text_encoders(pretrained, dtype=dtype, device=device)
        encode_start = time.perf_counter()
        prompts = list(pending)
        bar = tqdm(total=len(prompts), desc="vectorize", unit="prompt", disable=not progress)
        for begin in range(0, len(prompts), batch_size):
            batch = prompts[begin : begin + batch_size]
            embeds, pooled = encode_prompts(pipe, batch, max_sequence_length, device)
            for prompt, embed_row, pooled_row in zip(batch, embeds, pooled, strict=True):
                for position in pending[prompt]:
                    path = empty_path if position == -1 else item_vector_path(vectors_dir, position)
                    save_vectors(path, embed_row, pooled_row, prompt)
            bar.update(len(batch))
        bar.close()
        encode_seconds = time.perf_counter() - encode_start
        del pipe

    write_jsonl_atomic(out_index, ({**item.record, "index": pos} for pos, item in enumerate(items)))
    return VectorizeReport(
        items=len(items),
        encoded_items=encoded_items,
        skipped_items=len(items) - encoded_items,
        encoded_prompts=len(pending),
        seconds=time.perf_counter() - start,
        encode_seconds=encode_seconds,
        out_index=Path(out_index),
        vectors_dir=vectors_dir,
    )
