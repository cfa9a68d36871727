"""The on-disk store of prompt vectors made by `preprocess/vectorize.py`.

Vectors of item `i` of an index live in `<vectors_dir>/<i>.safetensors` (`prompt_embeds` [seq, dim],
`pooled_prompt_embeds` [dim], no batch axis); the empty prompt used for classifier-free guidance lives in
`<vectors_dir>/empty.safetensors`. Each file records its prompt in the header, so re-runs can detect edits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crfm.data.index import DatasetError, IndexItem
from crfm.utils.errors import reading
from crfm.utils.fileio import atomic_path

VECTOR_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


EMPTY_PROMPT_FILE = "empty.safetensors"


SETTINGS_FILE = "vectors.json"


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
    with reading(path, "prompt vectors (re-run preprocess/vectorize.py: it re-encodes damaged files)"):
        tensors = load_file(str(path))
        # Copies, not views of the memory-mapped file: a file damaged or rewritten later can't fault them.
        return {key: tensors[key].clone() for key in VECTOR_KEYS}


def load_item_vectors(vectors_dir: str | Path, item: IndexItem) -> dict[str, torch.Tensor]:
    """Vectors of one index item; the index must be the one written by vectorize (it has `index`)."""
    if "index" not in item.record:
        raise DatasetError(
            f"{item.where()}: no 'index' field. Use the index written by preprocess/vectorize.py "
            "(its --out_json_file), whose 'index' names the vector file."
        )
    path = item_vector_path(vectors_dir, int(item.record["index"]))
    if not path.is_file():
        raise DatasetError(
            f"{item.where()}: vector file {path} is missing. Run preprocess/vectorize.py on this index "
            f"with --work_dir {vectors_dir} first."
        )
    return load_vectors(path)


def load_empty_prompt_vectors(vectors_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(vectors_dir) / EMPTY_PROMPT_FILE
    if not path.is_file():
        raise DatasetError(f"{path} is missing: run preprocess/vectorize.py (it encodes the empty prompt once)")
    return load_vectors(path)
