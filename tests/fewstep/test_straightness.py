"""Straightness S_K of a sampling path, and python -m crfm.evaluate_sampling end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crfm.fewstep.straightness import VelocityRecorder, straightness
from tests.helpers import ColourSegmentor


def path_of(position, velocity, sigmas: list[float]) -> tuple[VelocityRecorder, torch.Tensor]:
    """A recorded Euler-grid path: x(σ) = position(σ), v(σ) = velocity(σ) (dx/dσ), at σ_0 … σ_{N−1}; x(0)."""
    recorder = VelocityRecorder()
    for sigma in sigmas:
        recorder(0, torch.tensor(sigma), position(sigma), velocity(sigma))
    return recorder, position(0.0)


SIGMAS = [1.0 - i / 40 for i in range(40)]
START, END = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).unbind(0)


def test_a_straight_path_has_zero_straightness():
    recorder, final = path_of(lambda s: (s * START + (1 - s) * END)[None], lambda s: (START - END)[None], SIGMAS)
    for segments in (1, 2, 4):
        result = straightness(recorder, final, segments)
        assert result["value"] == pytest.approx(0.0, abs=1e-10)
        assert len(result["per_segment"]) == segments


def test_a_curved_path_is_straighter_piece_by_piece():
    # x(σ) = σ² a + (1 − σ²) b: a parabola in σ, velocity 2σ (a − b); the chord's velocity is a − b.
    direction = START - END
    recorder, final = path_of(lambda s: (s * s * START + (1 - s * s) * END)[None], lambda s: (2 * s * direction)[None],
                              SIGMAS)  # fmt: skip
    # ∫ (1 − 2σ)² dσ over [0, 1] = 1/3 times the mean square of a − b; the Riemann sum on 40 steps is close.
    expected = direction.pow(2).mean().item() / 3
    whole = straightness(recorder, final, 1)
    assert whole["value"] == pytest.approx(expected, rel=0.08)
    halves, quarters = straightness(recorder, final, 2), straightness(recorder, final, 4)
    assert quarters["value"] < halves["value"] < whole["value"]
    assert halves["value"] == pytest.approx(expected / 4, rel=0.1)  # each half's chord removes 3/4 of it
    with pytest.raises(ValueError, match="divide"):
        straightness(recorder, final, 3)


def test_detail_sees_blur():
    from crfm.fewstep.evaluate import detail

    sharp = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1)
    assert detail(blurred) < 0.3 * detail(sharp)
    assert detail(torch.zeros(1, 3, 8, 8)) == 0.0


def test_evaluate_sampling_reports_fidelity_nfe_speed_and_straightness(
    tiny_sd35_dir, trained_checkpoint, tmp_path, monkeypatch, capsys
):
    from crfm.data.vectorize import vectorize_index
    from crfm.fewstep import evaluate as evaluate_sampling
    from crfm.segmentation import adapter
    from crfm.toy.toydata import write_dataset

    write_dataset(tmp_path / "data", num=3, size=64, seed=2)
    data = tmp_path / "data"
    vectorize_index(tiny_sd35_dir, data / "index.jsonl", data / "index_.jsonl", tmp_path / "vec")
    monkeypatch.setattr(adapter, "load_segmentor", lambda *a, **k: ColourSegmentor())  # the judge
    work = tmp_path / "eval"
    status = evaluate_sampling.main(
        [
            "--pretrained_model_name_or_path",
            str(tiny_sd35_dir),
            "--lora_ckpt",
            str(trained_checkpoint),
            "--data_root",
            str(data),
            "--vectors_path",
            str(tmp_path / "vec"),
            "--num_cls",
            "6",
            "--resolution",
            "64",
            "--judge_config",
            "judge.py",
            "--judge_ckpt",
            "judge.pth",
            "--runs",
            "euler:2:uniform",
            "heun:2",
            "rk45:4",
            "--straightness_steps",
            "4",
            "--straightness_segments",
            "1",
            "2",
            "--work_dir",
            str(work),
            "--no_progress",
            "--batch_size",
            "2",
        ]  # fmt: skip
    )
    assert status == 0
    report = json.loads((work / "results.json").read_text())
    assert [run["nfe"] for run in report["runs"][:2]] == [2, 3]
    assert report["runs"][2]["nfe"] > 4 and report["runs"][1]["sigma_grid"] == "diffusers"
    assert all(0 <= run["mIoU"] <= 1 and run["images_per_second"] > 0 for run in report["runs"])
    assert all(run["detail_ratio"] > 0 for run in report["runs"])
    assert [s["segments"] for s in report["straightness"]] == [1, 2]
    assert all(math.isfinite(s["value"]) and s["value"] >= 0 for s in report["straightness"])
    assert report["straightness"][1]["value"] <= report["straightness"][0]["value"] + 1e-9
    assert (work / "fidelity_vs_nfe.png").stat().st_size > 0
    assert evaluate_sampling.main(["--runs", "dpm:4", *_required(tiny_sd35_dir, trained_checkpoint, data)]) == 2
    # Mask guidance as test.py has it: refused for a checkpoint whose null-mask branch was never trained.
    argv = ["--mask_guidance_scale", "1.5", *_required(tiny_sd35_dir, trained_checkpoint, data)]
    assert evaluate_sampling.main(argv) == 2
    assert "trained without --mask_dropout" in capsys.readouterr().err
    assert report["mask_guidance_scale"] == 1.0


def _required(pipe, ckpt, data) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(pipe), "--lora_ckpt", str(ckpt), "--data_root", str(data),
        "--vectors_path", "vec", "--num_cls", "6", "--judge_config", "j.py", "--judge_ckpt", "j.pth",
    ]  # fmt: skip
