"""train.py --optimizer: torch's AdamW, bitsandbytes' 8-bit AdamW (CUDA only, refused in one line elsewhere) and
transformers' Adafactor (with a fixed learning rate, so the schedule means what it means for AdamW)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from crfm.training.build import make_optimizer
from crfm.training.train import build_parser, main, train
from tests.helpers import vectorized_toy_data


@pytest.fixture(scope="module")
def toy(tiny_sd35_dir, tmp_path_factory) -> dict:
    return vectorized_toy_data(tmp_path_factory.mktemp("optimizers"), tiny_sd35_dir, num=4, seed=11)


def train_argv(toy: dict, work, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(toy["pipe"]), "--data_root", str(toy["data"]),
        "--vectors_path", str(toy["vectors"]), "--work_dir", str(work), "--num_cls", "6", "--resolution", "32",
        "--train_batch_size", "2", "--report_to", "none", "--no_progress", *extra,
    ]  # fmt: skip


def test_optimizers_are_the_libraries_own():
    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    defaults = build_parser().parse_args(train_argv({"pipe": "-", "data": "-", "vectors": "-"}, "-"))
    assert type(make_optimizer(defaults, params)) is torch.optim.AdamW
    adafactor = make_optimizer(argparse.Namespace(**{**vars(defaults), "optimizer": "adafactor"}), params)
    from transformers.optimization import Adafactor

    assert isinstance(adafactor, Adafactor)
    group = adafactor.param_groups[0]
    assert group["lr"] == defaults.learning_rate and not group["relative_step"] and not group["scale_parameter"]


def test_adafactor_trains_and_is_recorded(toy, tmp_path):
    summary = train(build_parser().parse_args(train_argv(toy, tmp_path, "--optimizer", "adafactor",
                                                         "--max_train_steps", "3")))  # fmt: skip
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert json.loads((tmp_path / "final" / "crfm_checkpoint.json").read_text())["optimizer"] == "adafactor"
    assert load_file(tmp_path / "final" / "model.safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_adamw8bit_without_cuda_is_one_error_line(toy, tmp_path, capsys):
    assert main(train_argv(toy, tmp_path / "work", "--optimizer", "adamw8bit")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --optimizer adamw8bit needs CUDA"), err
    assert not (tmp_path / "work").exists()
