"""What makes a work folder a contract: atomic file writes (a killed job leaves either the old file, the new file,
or nothing — never half), append-only progress records that survive any cut, a full disk named in one line, the
one check that a resumable store is continued with the settings it was made with, and a lock that keeps a second
live process out of a folder."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from crfm.utils.errors import UsageError, unreadable

TMP_MARKER = ".tmp-"
LOCK_FILE = ".crfm.lock"
# A write that fails while less than this is free failed for want of space, whatever the library says
# (torch.save reports a full disk as `basic_ios::clear: iostream error` or `unexpected pos`).
_FULL_DISK_BYTES = 1 << 20


def disk_full(error: BaseException, path: str | Path) -> bool:
    """Whether `error`, raised while writing under `path`, means the file system is full: an ENOSPC OSError,
    a library's error quoting `os error 28` (safetensors), or an I/O error while (almost) no space is left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if "os error 28" in str(error) or "No space left on device" in str(error):
        return True
    if isinstance(error, (ValueError, TypeError, KeyError, AttributeError)):  # a program's or data's error
        return False
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < _FULL_DISK_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Within: a write that fails for want of space becomes one `<path>: no space left on device` error (an
    OSError, so entry points report it in one line with exit status 2); other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and exc.filename is not None:
            raise  # names its file already (an inner write's)
        if disk_full(exc, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is a same-filesystem rename (atomic on POSIX). The suffix keeps the
    # extension last so libraries that infer the format from the name (PIL) still work.
    tmp = path.with_name(f".{path.stem}{TMP_MARKER}{os.getpid()}{path.suffix}")
    try:
        with writing(path):
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


def sha256_of_files(paths: Sequence[Path]) -> str:
    """One digest of the names and bytes of `paths` (in the given order): content, not times, so a copied file is
    the same and a rewritten one is not."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_records(path: str | Path) -> list[dict]:
    """The records of an append-only JSON-lines file (a job's progress), in order; [] if there is none.

    A line a kill, a power cut or a full disk cut short (not a JSON object: the last one, as `append_records` cuts
    such a tail off before it appends) is dropped, so the item it stood for is redone; the job checks on disk the
    files of every record it keeps."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None  # cut short: its item is redone
        if isinstance(record, dict):
            records.append(record)
    return records


def _complete_length(handle) -> int:
    """Bytes of a file up to and including its last newline: where its last complete record ends."""
    position = handle.seek(0, os.SEEK_END)
    while position > 0:
        start = max(0, position - (1 << 16))
        handle.seek(start)
        cut = handle.read(position - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        position = start
    return 0


def append_records(path: str | Path, records: Iterable[dict]) -> None:
    """Append `records` as JSON lines after the file's last complete line: a tail cut by a kill or a full disk is
    cut off first, so it can never swallow the next record. A full disk is named in one line (`writing`)."""
    path = Path(path)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as handle:
            complete = _complete_length(handle)
            if complete != handle.tell():
                handle.truncate(complete)
            handle.write(payload)


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder`'s lock while a job writes into it: a second live process is refused in one line naming the
    process that holds it. The lock is the kernel's (`flock`) on `folder/.crfm.lock`, so a process that dies,
    even by SIGKILL, releases it and the next run takes it over; the file stays, holding the last owner's pid."""
    import fcntl

    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise UsageError(
                f"{folder}: in use by {owner} (lock {lock}); wait for it to end, or use another --work_dir"
            ) from None
        with writing(lock):
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
        try:
            yield lock
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
