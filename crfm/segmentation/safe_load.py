"""Safe loading of segmentor checkpoints: never execute pickled code.

Checkpoints are only ever read with `torch.load(..., weights_only=True)` and a short allowlist of the
non-tensor objects that mmengine's `CheckpointHook` writes (`MMENGINE_SAFE_GLOBALS`); a pickle naming any
other global (e.g. `os.system` in a `__reduce__`) is refused before anything is called.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


def _numpy_safe_globals() -> list[Any]:
    """numpy objects in mmengine checkpoints: the HistoryBuffer arrays and numpy scalars of the message hub.

    Listed under both numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) names so checkpoints written with either
    load. Array/scalar reconstruction only builds data; ndarray's `__setstate__` runs no user code.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    # Concrete dtype classes only so dtype objects may be BUILT (state set); no object dtype among them.
    numeric = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    numeric += ("float16", "float32", "float64")
    out: list[Any] = [np.ndarray, np.dtype, *(type(np.dtype(n)) for n in numeric)]
    for core in ("numpy.core", "numpy._core"):
        out += [(_reconstruct, f"{core}.multiarray._reconstruct"), (scalar, f"{core}.multiarray.scalar")]
    return out


_HISTORY_BUFFER_STATISTICS = frozenset({"min", "max", "current", "mean"})


def _history_buffer_getattr(owner: Any, name: str) -> Any:
    """Stand-in for `builtins.getattr` while unpickling: yields only HistoryBuffer's statistic methods.

    `HistoryBuffer.__getstate__` includes its statistic methods ({"min": HistoryBuffer.min, ...}), which
    pickle stores as `getattr(HistoryBuffer, "min")`. The real `getattr` would hand a crafted file any
    attribute of any allowed object (a function's `__globals__`, say), so everything else is refused.
    """
    if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refusing getattr({owner!r}, {name!r}) in a checkpoint")


# What mmengine's Runner/CheckpointHook pickles besides tensors and builtin containers (found by saving a
# real checkpoint and listing what torch.serialization.get_unsafe_globals_in_checkpoint reports).
MMENGINE_SAFE_GLOBALS: list[Any] = [
    HistoryBuffer,
    (_history_buffer_getattr, "builtins.getattr"),
    *_numpy_safe_globals(),
]


@contextmanager
def mmengine_safe_globals() -> Iterator[None]:
    """Let `torch.load(weights_only=True)` (also mmengine's own, e.g. on resume) read mmengine checkpoints."""
    # HistoryBuffer.__setstate__ writes the file's statistics methods into a class-level registry; put
    # back what was there so a crafted file cannot leave odd objects in it.
    registry = dict(HistoryBuffer._statistics_methods)
    try:
        with torch.serialization.safe_globals(MMENGINE_SAFE_GLOBALS):
            yield
    finally:
        HistoryBuffer._statistics_methods.clear()
        HistoryBuffer._statistics_methods.update(registry)


def load_checkpoint_file(path: str | Path) -> dict:
    """The whole checkpoint object (weights-only unpickling); `.safetensors` files give {"state_dict": ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path), device="cpu")}
    with mmengine_safe_globals():
        # Explicit weights_only=True also wins over TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD in the environment.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: the checkpoint holds a {type(obj).__name__}, expected a dict (a state dict)")
    return obj


def _extract_state_dict(obj: dict, path: str | Path) -> dict[str, torch.Tensor]:
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: the checkpoint is not a state dict: entries {bad[:5]} are not named tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel/DDP wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def safe_load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from an mmengine `.pth` or a `.safetensors` file, never executing pickled code.

    Raises `pickle.UnpicklingError` (from torch's weights-only unpickler) for a pickle that names a global
    outside `MMENGINE_SAFE_GLOBALS`, and `ValueError` when the file holds no state dict.
    """
    return _extract_state_dict(load_checkpoint_file(path), path)


def weights_only_environment() -> None:
    """Make every `torch.load` in this process weights-only (mmengine's resume calls it without the flag)."""
    if os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None) is not None:
        print("ignoring TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: checkpoints are only loaded weights-only")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
