"""A base folder with a missing part is refused in one line that names the part, before anything is written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crfm.utils.base_folder import check_base_folder
from crfm.utils.flags import UsageError
from tests.helpers import REPO, subprocess_env

PARTS = ("transformer", "vae", "scheduler")


@pytest.fixture
def base_copy(tiny_sd35_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_sd35_dir, tmp_path / "base"))


def test_a_complete_base_passes(tiny_sd35_dir):
    assert check_base_folder(tiny_sd35_dir, (*PARTS, "text_encoder", "tokenizer_3")) == tiny_sd35_dir


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / "model_index.json").unlink(), "no model_index.json"),
        (lambda b: shutil.rmtree(b / "vae"), "lacks vae/"),
        (lambda b: (b / "transformer" / "config.json").unlink(), "transformer/ has no config.json"),
        (lambda b: (b / "transformer" / "diffusion_pytorch_model.safetensors").unlink(), "transformer/ has no weights"),
    ],
)
def test_each_missing_part_is_named(base_copy, damage, message):
    damage(base_copy)
    with pytest.raises(UsageError, match=message):
        check_base_folder(base_copy, PARTS)


def test_train_refuses_an_incomplete_base_in_one_line_and_writes_nothing(base_copy, tmp_path):
    shutil.rmtree(base_copy / "vae")
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "crfm.training.train", "--pretrained_model_name_or_path", str(base_copy)]
    cmd += ["--data_root", str(tmp_path), "--json_file", "none.jsonl", "--vectors_path", str(tmp_path)]
    cmd += ["--num_cls", "6", "--work_dir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks vae/" in lines[0]  # the base is checked before the data
    assert not work.exists()
