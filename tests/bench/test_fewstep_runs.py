"""bench/fewstep_runs.py: the 1-RF teacher samples, and makes its pairs, as the demo run it reads does."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script


@pytest.fixture
def bench(tmp_path, monkeypatch):
    module = load_script("bench/fewstep_runs.py")
    monkeypatch.setattr(module, "DEMOS", tmp_path / "demos")
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    commands = []
    monkeypatch.setattr(module, "run_logged", lambda argv, log: commands.append([str(a) for a in argv]))
    module.commands = commands
    return module


def demo_run(bench, seed: int, settings: dict | None) -> None:
    demo = bench.DEMOS / f"seed{seed}"
    (demo / "train" / "final").mkdir(parents=True)
    (demo / "toydata").mkdir()
    (demo / "toydata" / "train_.jsonl").write_text("{}\n" * 3)
    if settings is not None:
        (demo / "demo_settings.json").write_text(json.dumps(settings))


def value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_the_teacher_samples_as_the_demo_and_its_students_match_its_architecture(bench):
    demo_run(bench, 0, {"mask_encoding": "onehot", "mask_add": True, "mask_guidance_scale": 1.5,
                        "num_inference_steps": 10, "resolution": 64})  # fmt: skip
    bench.pairs(0, "plain")
    bench.student(0, "2rf")
    bench.evaluate(0, "2rf", bench.OUT / "seed0" / "2rf" / "final", bench.STUDENT_RUNS, "test")
    by_module = {argv[2]: argv for argv in bench.commands}  # [python, -m, module, ...]
    pairs, student = by_module["crfm.reflow"], by_module["crfm.training.train"]
    evaluation = by_module["crfm.evaluate_sampling"]
    assert value(pairs, "--mask_guidance_scale") == "1.5" and value(pairs, "--mask_encoding") == "onehot"
    assert value(pairs, "--num_per_mask") == str(bench.PAIRS_PER_MASK)
    assert "--mask_add" in student and value(student, "--mask_encoding") == "onehot"
    assert "--mask_guidance_scale" not in evaluation  # a student samples its teacher's guided map unguided
    runs = bench.teacher_runs(bench.DEMOS / "seed0")
    assert runs[0] == "euler:10" and len(runs) == len(set(runs)) == len(bench.TEACHER_RUNS) + 1
    assert bench.crfm_runs(bench.DEMOS / "seed0")[0] == "euler:10"


def test_a_run_from_before_the_recorded_settings_keeps_its_old_sampler(bench):
    demo_run(bench, 1, None)
    bench.pairs(1, "plain")
    (pairs,) = bench.commands
    assert value(pairs, "--mask_guidance_scale") == "1.0" and value(pairs, "--mask_encoding") == "rgb"
    assert sorted(bench.teacher_runs(bench.DEMOS / "seed1")) == sorted(bench.TEACHER_RUNS)  # euler:20 is one


def test_students_limits_the_trained_models_and_keeps_the_references(bench):
    demo_run(bench, 0, {"mask_encoding": "onehot"})
    names = [job.name for job in bench.tasks([0], ["seqrf4", "2rf"])]
    trained = [name for name in names if name.split("/")[1] in bench.STUDENTS]
    assert trained == ["0/2rf", "0/seqrf4"]  # the bench's order, not the caller's
    assert {"0/1rf", "0/pairs_plain", "0/pairs_crfm", "0/1rf_crfm", "0/1rf_crfm23"} <= set(names)
    assert len([job.name for job in bench.tasks([0], bench.ORDER)]) == len(names) + len(bench.ORDER) - 2
