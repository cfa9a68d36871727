"""python -m crfm.reflow: pairs whose noise is redrawn exactly, latent-sized storage, resumable without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from crfm.fewstep import pairs as reflow_pairs
from crfm.fewstep.pairs import build_parser, load_pair_latents, make_pairs, segment_indices
from tests.helpers import vectorized_toy_data


@pytest.fixture(scope="module")
def setup(tiny_sd35_dir, trained_checkpoint, tmp_path_factory) -> dict:
    toy = vectorized_toy_data(tmp_path_factory.mktemp("pairs"), tiny_sd35_dir, num=3, seed=11)
    return {**toy, "ckpt": trained_checkpoint}


def args_for(setup: dict, work: Path, *extra: str):
    return build_parser().parse_args(
        [
            "--pretrained_model_name_or_path",
            str(setup["pipe"]),
            "--data_root",
            str(setup["data"]),
            "--lora_ckpt",
            str(setup["ckpt"]),
            "--vectors_path",
            str(setup["vectors"]),
            "--num_cls",
            "6",
            "--resolution",
            "64",
            "--num_inference_steps",
            "4",
            "--sigma_grid",
            "uniform",
            "--num_per_mask",
            "2",
            "--work_dir",
            str(work),
            "--no_progress",
            "--seed",
            "5",
            *extra,
        ]  # fmt: skip
    )


def records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "index.jsonl").read_text().splitlines()]


def test_pairs_redraw_their_noise_and_store_one_latent_per_segment(setup, tmp_path):
    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.sampling.pipeline import MaskToImagePipeline
    from crfm.sampling.sampler import SolverConfig

    work = tmp_path / "pairs"
    summary = make_pairs(args_for(setup, work, "--segments", "2", "--batch_size", "4"))
    assert summary["synthesized"] == 6 and not summary["failures"]
    pairs = records(work)
    assert [p["unit"][:5] for p in pairs] == ["00000", "00000", "00001", "00001", "00002", "00002"]
    assert len({p["noise_id"] for p in pairs}) == 6
    # Storage: one latent per segment (the final latent + the one inner boundary), never the noise.
    with safe_open(str(work / pairs[0]["file"]), framework="pt") as handle:
        assert sorted(handle.keys()) == ["latents", "state_2"]
    stored = load_pair_latents(work, pairs[3])
    assert stored["latents"].shape == stored["state_2"].shape == (16, 8, 8)

    # The teacher, given the noise redrawn from (seed, noise_id) alone, reproduces the stored latents.
    pipe = MaskToImagePipeline.from_checkpoint(setup["ckpt"], setup["pipe"], num_cls=6)
    items = read_index(setup["data"] / "index_.jsonl", setup["data"])
    data = PairDataset(items, setup["data"], resolution=64, num_cls=6, vectors_dir=setup["vectors"])
    pair = pairs[3]
    sample = data[pair["position"]]
    out = pipe(
        sample["label"][None], sample["prompt_embeds"][None], sample["pooled_prompt_embeds"][None],
        noise_ids=[pair["noise_id"]], seed=pair["seed"], num_inference_steps=4,
        solver=SolverConfig(sigma_grid="uniform"), save_at=[2],
    )  # fmt: skip
    assert (out.latents[0] - stored["latents"]).abs().max() < 1e-5
    assert (out.states[2][0] - stored["state_2"]).abs().max() < 1e-5
    settings = json.loads((work / "reflow_pairs.json").read_text())
    assert settings["segments"] == 2 and settings["seed"] == 5 and settings["crfm"] is None


def test_a_killed_run_resumes_without_duplicates(setup, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    make_pairs(args_for(setup, reference, "--batch_size", "2"))
    work = tmp_path / "killed"
    original = reflow_pairs.LatentWriter.write
    calls = {"n": 0}

    def dies_on_the_second_batch(self, work_dir, batch, out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed while sampling the second batch
        return original(self, work_dir, batch, out)

    monkeypatch.setattr(reflow_pairs.LatentWriter, "write", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(args_for(setup, work, "--batch_size", "2"))
    monkeypatch.setattr(reflow_pairs.LatentWriter, "write", original)
    assert len((work / "index.rank0.jsonl").read_text().splitlines()) == 2

    summary = make_pairs(args_for(setup, work, "--batch_size", "2"))
    assert summary["done_before"] == 2 and summary["synthesized"] == 4
    resumed, expected = records(work), records(reference)
    assert [r["unit"] for r in resumed] == [r["unit"] for r in expected]  # each unit once, in plan order
    for mine, theirs in zip(resumed, expected, strict=True):
        assert torch.equal(load_pair_latents(work, mine)["latents"], load_pair_latents(reference, theirs)["latents"])


def test_other_settings_in_the_same_folder_and_bad_segments_are_refused(setup, tmp_path, capsys):
    work = tmp_path / "pairs"
    make_pairs(args_for(setup, work, "--num_per_mask", "1"))
    assert reflow_pairs.main([*_argv(setup, work), "--seed", "6"]) == 2
    assert "other settings (seed: 5 -> 6)" in capsys.readouterr().err
    assert reflow_pairs.main([*_argv(setup, tmp_path / "b"), "--segments", "3"]) == 2
    assert "must divide" in capsys.readouterr().err
    assert reflow_pairs.main([*_argv(setup, tmp_path / "c"), "--segments", "2", "--sigma_grid", "diffusers"]) == 2
    assert "uniform" in capsys.readouterr().err
    assert segment_indices(20, 4) == (5, 10, 15) and segment_indices(4, 1) == ()


def _argv(setup: dict, work: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(setup["pipe"]), "--data_root", str(setup["data"]),
        "--lora_ckpt", str(setup["ckpt"]), "--vectors_path", str(setup["vectors"]), "--num_cls", "6",
        "--resolution", "64", "--num_inference_steps", "4", "--num_per_mask", "1", "--sigma_grid", "uniform",
        "--work_dir", str(work), "--no_progress", "--seed", "5",
    ]  # fmt: skip
