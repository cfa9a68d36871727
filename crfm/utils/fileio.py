"""Atomic file writes: a killed job leaves either the old file, the new file, or nothing — never half. And the one
check that a resumable store is continued with the settings it was made with."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from crfm.utils.errors import UsageError, unreadable

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


def read_json(path: str | Path, what: str) -> object:
    """A JSON file crfm wrote (a record of settings, a checkpoint's meta); a damaged one is named in one line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise unreadable(path, what, exc) from exc


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries left by a killed run in `folder`; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and TMP_MARKER in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def refuse_changed_settings(
    record: str | Path,
    settings: Mapping[str, object],
    what: str,
    fix: str,
    defaults: Mapping[str, object] | None = None,
    error: type[ValueError] = UsageError,
) -> bool:
    """Refuse to continue a store whose settings file `record` holds other `settings` than this run's, so that every
    file in it was made the same way: raises `error` (one line: the folder, each changed setting, `fix`). A key the
    record lacks counts as its value in `defaults` (a setting added since it was written). Returns whether the
    record exists."""
    record = Path(record)
    if not record.is_file():
        return False
    before = {**(defaults or {}), **read_json(record, "the settings record")}
    changed = [
        f"{key}: {before.get(key)!r} -> {value!r}" for key, value in settings.items() if before.get(key) != value
    ]
    if changed:
        raise error(f"{record.parent}: holds {what} made with other settings ({'; '.join(changed)}); {fix}")
    return True
