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


def test_a_warm_up_the_constant_schedule_would_drop_is_refused_and_a_cosine_one_is_run(toy, tmp_path, capsys):
    """diffusers' `constant` schedule takes no warm-up: train.py refuses the pair in one line instead of dropping the
    steps; `constant_with_warmup` and `cosine` ramp the rate up as asked (the loss log's lr)."""
    assert main(train_argv(toy, tmp_path / "work", "--lr_warmup_steps", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lr_scheduler constant has no warm-up"), err
    assert not (tmp_path / "work").exists()
    for schedule in ("constant_with_warmup", "cosine"):
        work = tmp_path / schedule
        flags = ("--lr_scheduler", schedule, "--lr_warmup_steps", "2", "--max_train_steps", "4")
        train(build_parser().parse_args(train_argv(toy, work, *flags)))
        rates = [json.loads(line)["lr"] for line in (work / "loss.jsonl").read_text().splitlines()]
        lr = build_parser().parse_args(train_argv(toy, work)).learning_rate
        assert rates[0] == pytest.approx(lr / 2) and rates[1] == pytest.approx(lr), (schedule, rates)
        assert rates[3] == (pytest.approx(lr) if schedule == "constant_with_warmup" else pytest.approx(0.0, abs=1e-12))
