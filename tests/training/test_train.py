"""train.py: deterministic resume after a kill, two data-parallel CPU ranks, checkpoints, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crfm.data.dataset import PairDataset
from crfm.data.index import DatasetError, read_index
from crfm.training.build import check_items
from crfm.training.checkpoints import list_checkpoints, resolve_resume
from tests.helpers import REPO, vectorized_toy_data

TRAIN = [sys.executable, str(REPO / "train.py")]


@pytest.fixture(scope="module")
def toy(tiny_sd35_dir, tmp_path_factory) -> dict:
    """12 toy scenes at 64 px, vectorized with the tiny pipeline."""
    return vectorized_toy_data(tmp_path_factory.mktemp("toy"), tiny_sd35_dir, num=12, seed=5)


def train_args(toy: dict, work_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(toy["pipe"]), "--data_root", str(toy["data"]),
        "--vectors_path", str(toy["vectors"]), "--work_dir", str(work_dir), "--num_cls", "6",
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
        "--report_to", "none", "--no_progress", *extra,
    ]  # fmt: skip


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, **kwargs)


def losses(work_dir: Path) -> list[tuple[int, float]]:
    lines = (work_dir / "loss.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_killed_run_resumes_with_the_same_losses(toy, tmp_path):
    steps = 40
    reference = run(TRAIN + train_args(toy, tmp_path / "ref", steps, "--checkpointing_steps", "4"))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected = losses(tmp_path / "ref")
    assert [s for s, _ in expected] == list(range(1, steps + 1))
    assert all(np.isfinite(loss) for _, loss in expected)
    assert (tmp_path / "ref" / "loss_curve.png").is_file()
    # Only the last K=3 checkpoints are kept.
    assert [p.name for p in list_checkpoints(tmp_path / "ref")] == [f"checkpoint-{n}" for n in (32, 36, 40)]

    work = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = TRAIN + train_args(toy, work, steps, "--checkpointing_steps", "4")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (work / "checkpoints" / "checkpoint-8").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "final").exists(), "the run finished before it could be killed; the test proved nothing"
    killed_at = len(losses(work))

    resumed = run(
        TRAIN + train_args(toy, work, steps, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert losses(work) == expected, f"killed after {killed_at} logged steps"
    ref_weights = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    new_weights = load_file(work / "final" / "model.safetensors")
    assert ref_weights.keys() == new_weights.keys()
    assert all(torch.equal(ref_weights[k], new_weights[k]) for k in ref_weights)


def test_two_cpu_ranks_split_the_data_and_agree(toy, tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "configs" / "accelerate_cpu_2proc.yaml"), str(REPO / "train.py"),
        *train_args(toy, tmp_path, 6, "--checkpointing_steps", "3", "--record_batches"),
    ]  # fmt: skip
    result = run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_epoch = 12 // (2 * 2)  # items / (ranks * batch)
    for epoch in range(2):
        seen = [sum(rank["positions"][epoch * per_epoch : (epoch + 1) * per_epoch], []) for rank in ranks]
        assert not set(seen[0]) & set(seen[1]), "ranks trained on the same items in one epoch"
        assert sorted(seen[0] + seen[1]) == list(range(12)), "an epoch did not cover the dataset exactly once"
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "ranks ended with different weights"
    # The saved weights are that one model.
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(tmp_path / "final" / "model.safetensors").items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    assert digest.hexdigest() == ranks[0]["weights_sha256"]


def test_lora_run_saves_only_what_it_trained(toy, tmp_path):
    from crfm.models.trained_weights import load_trained, read_checkpoint_meta

    result = run(TRAIN + train_args(toy, tmp_path, 3, "--train_mode", "lora", "--lora_rank", "4"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mode lora" in result.stdout and "M trainable" in result.stdout
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert weights and all("lora_" in k or k.startswith(("mask_embed.", "mask_blocks.")) for k in weights)
    meta = read_checkpoint_meta(tmp_path / "final")
    assert meta["train_mode"] == "lora" and meta["lora_rank"] == 4 and meta["num_cls"] == 6
    model, _ = load_trained(tmp_path / "final")
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())

    # Resuming a finished run trains nothing more (regression: it once took one extra step).
    again = run(TRAIN + train_args(toy, tmp_path, 3, "--train_mode", "lora", "--lora_rank", "4",
                                   "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]
    after = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_latest_ignores_half_written_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("checkpoint-9", "checkpoint-10", ".tmp-checkpoint-11"):
        (folder / name).mkdir(parents=True)
    assert resolve_resume(tmp_path, "latest") == folder / "checkpoint-10"  # numeric order, temp folder ignored
    assert resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def _broken_dataset(toy, tmp_path: Path, damage: str) -> tuple[PairDataset, Path]:
    data = tmp_path / "data"
    data.mkdir()
    items = read_index(toy["data"] / "index_.jsonl")
    lines = []
    for item in items[:3]:
        for key in ("source", "target"):
            (data / getattr(item, key)).parent.mkdir(parents=True, exist_ok=True)
            (data / getattr(item, key)).write_bytes((toy["data"] / getattr(item, key)).read_bytes())
        lines.append(json.dumps(item.record))
    victim = items[1]
    if damage == "class id":
        label = np.array(Image.open(data / victim.source))
        label[0, 0] = 9
        Image.fromarray(label).save(data / victim.source)
    elif damage == "size":
        Image.open(data / victim.target).resize((48, 64)).save(data / victim.target)
    elif damage == "unreadable":
        (data / victim.target).write_bytes(b"\x89PNG truncated")
    (data / "index_.jsonl").write_text("\n".join(lines) + "\n")
    items = read_index(data / "index_.jsonl")
    return PairDataset(items, data, resolution=32, num_cls=6, vectors_dir=toy["vectors"]), data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("class id", r"class id\(s\) \[9\] >= num_cls=6"),
        ("size", "differs from label size"),
        ("unreadable", "cannot read"),
    ],
)
def test_bad_items_are_named_before_training(toy, tmp_path, damage, message):
    dataset, _ = _broken_dataset(toy, tmp_path, damage)
    with pytest.raises(DatasetError, match=message) as err:
        check_items(dataset)
    assert "index_.jsonl:2" in str(err.value)  # the line of the damaged item


def test_missing_vectors_stop_train_py_with_a_hint(toy, tmp_path):
    result = run(TRAIN + train_args(toy, tmp_path / "work", 2, "--vectors_path", str(tmp_path / "novec")))
    assert result.returncode == 2
    # One `error: ...` line on stderr (crfm.utils.flags.run_cli), naming the file and the fix.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "vectorize" in last and "empty.safetensors" in last
    assert not (tmp_path / "work" / "checkpoints").exists()
