"""A work folder's contract (crfm.utils.fileio): progress records that survive any cut, a full disk named in one
line, a lock that keeps a second live process out and is taken over from a dead one."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crfm.utils.errors import UsageError, one_line
from crfm.utils.fileio import (
    LOCK_FILE,
    append_records,
    atomic_path,
    folder_lock,
    read_records,
    write_text_atomic,
    writing,
)
from tests.helpers import subprocess_env


def test_a_cut_last_line_is_dropped_and_cut_off_before_the_next_append(tmp_path):
    record = tmp_path / "index.rank0.jsonl"
    append_records(record, [{"unit": "a"}, {"unit": "b"}])
    with record.open("a") as handle:  # what a kill or a full disk leaves while the next line is written
        handle.write('{"unit": "c", "prompt": "a sat')

    assert read_records(record) == [{"unit": "a"}, {"unit": "b"}]  # not json's "Unterminated string ..."
    append_records(record, [{"unit": "c"}])
    assert record.read_text() == '{"unit": "a"}\n{"unit": "b"}\n{"unit": "c"}\n'
    assert read_records(tmp_path / "none.jsonl") == []


def test_a_cut_first_line_leaves_an_empty_record(tmp_path):
    record = tmp_path / "loss.jsonl"
    record.write_text('{"step": 1, "lo')
    assert read_records(record) == []
    append_records(record, [{"step": 1}])
    assert read_records(record) == [{"step": 1}] and record.read_text() == '{"step": 1}\n'


def test_an_os_error_names_its_file_first():
    error = OSError(errno.ENOENT, "No such file or directory", "configs/seg.py")
    assert one_line(error) == "configs/seg.py: no such file or directory"
    assert one_line(OSError(errno.ENOSPC, "No space left on device")) == "[Errno 28] No space left on device"


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),  # a plain write(): no file named
        Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... os error 28"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),  # torch.save, disk full
    ],
    ids=["ENOSPC", "safetensors", "torch.save"],
)
def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, failure):
    import shutil

    if isinstance(failure, RuntimeError):  # torch does not say why: the file system's free space does
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    target = tmp_path / "img" / "x.png"
    with pytest.raises(OSError) as caught, atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise failure
    assert one_line(caught.value) == f"{target}: no space left on device"
    assert not target.exists() and list(target.parent.iterdir()) == []  # the temporary is gone


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"), writing(tmp_path):  # the disk has room
        raise RuntimeError("unexpected pos 64 vs 0")
    with pytest.raises(ValueError, match="bad"), writing(tmp_path):
        raise ValueError("bad")


HOLD = """
import sys, time
from crfm.utils.fileio import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_holder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    work = tmp_path / "synth"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in work.iterdir())
        with pytest.raises(UsageError) as refused, folder_lock(work):
            pytest.fail("a second process got the lock")
        line = one_line(refused.value)
        assert line.startswith(f"{work}: in use by process {holder.pid} on "), line
        assert sorted(p.name for p in work.iterdir()) == before == [LOCK_FILE]
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays
        holder.wait()
    assert (work / LOCK_FILE).is_file()
    with folder_lock(work):  # the kernel released the dead holder's lock
        assert (work / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")


def test_the_lock_is_released_when_the_job_ends(tmp_path):
    with folder_lock(tmp_path / "w"):
        write_text_atomic(tmp_path / "w" / "a.json", json.dumps({}))
    with folder_lock(tmp_path / "w"):  # the same process again: released on exit
        pass
    assert Path(tmp_path / "w" / "a.json").is_file()
