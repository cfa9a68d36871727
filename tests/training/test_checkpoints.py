"""Checkpoints in-process: the one trained-weights loader (used by load_trained and accelerate's load hook), the
accelerate hooks that store only what is trained, and atomic saves that keep the last K."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from crfm.models.conditioning import DEFAULT_MASK_ENCODING
from crfm.models.mmdit import MaskSD3Transformer2DModel
from crfm.models.trained_weights import (
    CHECKPOINT_WEIGHTS,
    configure_training,
    load_trained_weights,
    save_trained,
    trained_state_dict,
)
from crfm.training.checkpoints import list_checkpoints, register_checkpoint_hooks, save_checkpoint

META = {"train_mode": "lora", "lora_rank": 4, "num_cls": 6}


def lora_model(pipe_dir) -> MaskSD3Transformer2DModel:
    model = MaskSD3Transformer2DModel.from_sd3(pipe_dir)
    configure_training(model, "lora", lora_rank=4)
    return model


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # no process-wide state left to other tests
    GradientState._reset_state()


def test_load_trained_weights_names_what_does_not_fit(tiny_sd35_dir):
    model = lora_model(tiny_sd35_dir)
    weights = {name: torch.full_like(t, 0.25) for name, t in trained_state_dict(model).items()}
    assert load_trained_weights(model, weights) is model
    assert all(torch.equal(t, weights[name]) for name, t in trained_state_dict(model).items())

    name = sorted(weights)[0]
    broken = {k: v for k, v in weights.items() if k != name}
    broken["not.a.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"does not fit the lora model: 1 missing .*1 unexpected .*0 of another"):
        load_trained_weights(model, broken, target="the lora model")
    reshaped = {**weights, name: torch.zeros(3, 5)}
    with pytest.raises(ValueError, match=r"0 missing .*0 unexpected .*1 of another shape"):
        load_trained_weights(model, reshaped)


def test_checkpoint_hooks_store_and_restore_only_trained_weights(accelerator, tiny_sd35_dir, tmp_path):
    register_checkpoint_hooks(accelerator, META, target="the test model")
    model = accelerator.prepare(lora_model(tiny_sd35_dir))
    for step in (1, 2, 3):
        folder = save_checkpoint(accelerator, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    saved = load_file(folder / CHECKPOINT_WEIGHTS)
    assert set(saved) == set(trained_state_dict(model))  # LoRA + mask branch, no frozen base weight
    assert all("lora_" in k or k.startswith(("mask_embed.", "mask_blocks.")) for k in saved)

    with torch.no_grad():
        for param in trained_state_dict(model).values():
            param.add_(1.0)
    accelerator.load_state(str(folder))
    assert all(torch.equal(t, saved[name]) for name, t in trained_state_dict(model).items())

    # The load hook checks the checkpoint against the model: a full-mode model does not fit a LoRA checkpoint.
    other = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    configure_training(other, "full")
    accelerator._models.clear()
    accelerator.prepare(other)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-3 does not fit the test model: \d+ missing"):
        accelerator.load_state(str(folder))


@pytest.mark.parametrize(
    ("saved", "error"),
    [
        ({"mask_encoding": "palette"}, "trained with --mask_encoding palette, not --mask_encoding grey"),
        ({"num_cls": 7}, "trained with num_cls=7, not --num_cls 6"),
    ],
    ids=["mask_encoding", "num_cls"],
)
def test_resume_refuses_a_checkpoint_of_other_inputs(accelerator, tiny_sd35_dir, tmp_path, saved, error):
    """Grey and palette mask branches have the same shapes, so only the recorded encoding can tell them apart."""
    model = lora_model(tiny_sd35_dir)
    folder = save_trained(model, tmp_path / "checkpoint-1", {**META, **saved})
    register_checkpoint_hooks(accelerator, META)  # this run: grey (no key), num_cls 6
    accelerator.prepare(model)
    before = {name: t.clone() for name, t in trained_state_dict(model).items()}
    with torch.no_grad():
        for param in trained_state_dict(model).values():
            param.add_(1.0)
    moved = {name: t.clone() for name, t in trained_state_dict(model).items()}
    with pytest.raises(ValueError, match=error):
        accelerator.load_state(str(folder))
    assert all(torch.equal(t, moved[name]) for name, t in trained_state_dict(model).items())  # nothing loaded
    assert not any(torch.equal(t, before[name]) for name, t in trained_state_dict(model).items())


def test_train_flag_and_checkpoint_meta_record_the_mask_encoding():
    from crfm.training.build import checkpoint_meta
    from crfm.training.train import build_parser

    required = ["--pretrained_model_name_or_path", "p", "--data_root", "d", "--vectors_path", "v", "--num_cls", "6"]
    assert checkpoint_meta(build_parser().parse_args(required))["mask_encoding"] == DEFAULT_MASK_ENCODING
    args = build_parser().parse_args([*required, "--mask_encoding", "grey"])
    assert checkpoint_meta(args)["mask_encoding"] == "grey"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*required, "--mask_encoding", "rgb"])
