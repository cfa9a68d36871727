"""Atomic file writes: a killed job leaves either the old file, the new file, or nothing — never half."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_MARKER = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a same-filesystem rename (atomic on POSIX). The suffix keeps the
    # extension last so libraries that infer the format from the name (PIL) still work.
    tmp = path.with_name(f".{path.stem}{TMP_MARKER}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left by a killed run in `folder`; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and TMP_MARKER in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
