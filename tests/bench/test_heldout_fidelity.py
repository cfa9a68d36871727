"""bench/heldout_fidelity.py and bench/rerun_runs.py: the generator's fine-tuning knobs (learning rate, schedule,
EMA, translations, steps) change only from the models stage on; any other knob is refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_script


def _rerun_runs():
    return load_script("bench/rerun_runs.py")


def test_fine_tuning_knobs_change_only_from_the_models_stage():
    bench = _rerun_runs()
    knobs = "--learning_rate 0.002 --lr_schedule cosine --ema_decay 0.99 --translate 4 --train_steps 1800"
    assert bench.knob_values(knobs, "models") == {
        "learning_rate": 0.002, "lr_schedule": "cosine", "ema_decay": 0.99, "translate": 4, "train_steps": 1800,
    }  # fmt: skip
    for start in ("synthesis", "filter"):
        for knob in ("--learning_rate 0.002", "--translate 4", "--train_steps 1800"):
            with pytest.raises(SystemExit, match=knob.split()[0]):
                bench.knob_values(knob, start)


def test_heldout_fidelity_refuses_a_knob_that_is_not_the_generators_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "demo_settings.json").write_text(json.dumps({"seed": 0}))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "heldout_fidelity.py"), "--run", str(run), "--train", str(tmp_path),
           "--knobs", "--seg_iters 5", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "--seg_iters" in proc.stderr, proc.stderr
    assert not out.exists()


def test_heldout_fidelity_refuses_a_base_whose_text_encoders_are_not_the_runs(tmp_path):
    """`--knobs "--base FOLDER"`: the copy decodes through that base but reuses the run's prompt vectors, so a base
    that encodes prompts otherwise is refused before anything is written."""
    run, base = tmp_path / "run", tmp_path / "base"
    for folder, content in ((run / "tiny_sd35", "run's"), (base, "other")):
        for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            (folder / part).mkdir(parents=True)
            (folder / part / "config.json").write_text(content if part == "text_encoder_2" else "same")
    (run / "demo_settings.json").write_text(json.dumps({"seed": 0, "base": "pretrained"}))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "heldout_fidelity.py"), "--run", str(run), "--train", str(tmp_path),
           "--knobs", f"--base {base}", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "text_encoder_2/config.json differs" in proc.stderr, proc.stderr
    assert not out.exists()
