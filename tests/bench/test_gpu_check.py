"""bench/gpu_check.sh, the one GPU check: its smoke mode runs the same code on the CPU and writes every row."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_script, subprocess_env

NUMBER = r"[0-9][0-9.e+-]*"


def test_smoke_run_writes_every_measurement(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, env=subprocess_env(PYTHON=sys.executable), cwd=REPO, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "CPU" in text and "2 layers, width 128" in text
    # Training: LoRA and full, 3 sizes, with s/step, FLOPs and TFLOP/s (no CUDA: no peak, no MFU, no GPU busy).
    for mode in ("lora", "full"):
        for px, batch in ((128, 1), (128, 4), (256, 1)):
            row = rf"^\| {mode} \| {px} \| {batch} \| {NUMBER} \| - \| {NUMBER} \| {NUMBER} \| - \| - \|$"
            assert re.search(row, text, re.M), (mode, px, batch, text)
    for sampler, steps in (("plain", 23), ("CRFM", 23), ("2-step student", 2)):
        row = rf"^\| {sampler}[^|]* \| {steps} \| {NUMBER} \| {NUMBER} \| - \| - \|$"
        assert re.search(row, text, re.M), (sampler, text)
    # The analytic FLOP count agrees with torch's counter (linear layers: the CPU build counts no flash attention).
    ratio = float(re.search(r"ratio ([0-9.]+)", text).group(1))
    assert 0.98 <= ratio <= 1.02


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("bench/gpu_check.py")


def test_refusals_are_one_line(gpu_check, capsys):
    assert gpu_check.main(["--smoke"]) == 2  # the smoke numbers never replace bench/results_gpu.md
    assert "--smoke needs --out" in capsys.readouterr().err
    if not gpu_check.torch.cuda.is_available():
        assert gpu_check.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_peak_lookup_by_device_name(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_check.peak_tflops("NVIDIA L40S", None) is None
    assert gpu_check.peak_tflops("NVIDIA L40S", 362.0) == 362.0


def test_the_training_step_is_train_pys(gpu_check, monkeypatch, tmp_path):
    """The check times `crfm.training.train.train_step` on a model built by `crfm.training.build`, not a copy."""
    import torch

    import crfm.training.train as train_module

    calls = []
    step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *args: calls.append(args) or step(*args))
    sizes, cpu = gpu_check.Sizes.smoke(), torch.device("cpu")
    args = gpu_check.train_args("lora", "adamw", "no", tmp_path)
    model = gpu_check.build_mask_model(sizes, cpu, args, torch.float32, training=True)
    assert model.gradient_checkpointing and any("lora" in name for name, _ in model.named_parameters())
    trainer = gpu_check.Trainer(model, sizes, args)
    before = [param.detach().clone() for param in trainer.trainable]
    trainer.step(gpu_check.cached_batch(sizes, 128, 1, cpu))
    assert len(calls) == 1 and calls[0][0] is trainer.accelerator
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.trainable, strict=True))
