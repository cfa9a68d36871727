"""test.py / crfm.synthesis: a dataset ready for training, resumable, per-item reproducible, sharded, CRFM on/off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crfm.data.index import read_index
from crfm.sampling.synthesis import build_parser, main, synthesize
from tests.helpers import REPO, ColourSegmentor, vectorized_toy_data


@pytest.fixture(scope="module")
def setup(tiny_sd35_dir, trained_checkpoint, tmp_path_factory) -> dict:
    """5 toy masks at 64 px, their vectors, and a 'trained' checkpoint (perturbed weights, full mode)."""
    toy = vectorized_toy_data(tmp_path_factory.mktemp("synth"), tiny_sd35_dir, num=5, seed=9)
    return {**toy, "ckpt": trained_checkpoint}


def cli(setup: dict, work: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(setup["pipe"]), "--data_root", str(setup["data"]),
        "--lora_ckpt", str(setup["ckpt"]), "--vectors_path", str(setup["vectors"]), "--num_cls", "6",
        "--resolution", "64", "--num_inference_steps", "4", "--work_dir", str(work), "--no_progress", *extra,
    ]  # fmt: skip


def run(setup: dict, work: Path, *extra: str) -> dict:
    return synthesize(build_parser().parse_args(cli(setup, work, *extra)))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_output_is_a_training_dataset_and_resumes(setup, tmp_path, capsys):
    work = tmp_path / "out"
    summary = run(setup, work, "--num_per_mask", "2", "--batch_size", "3", "--guidance_scale", "2.0", "--debug")
    assert summary["synthesized"] == 10 and not summary["failures"]
    items = read_index(work / "index.jsonl")  # a valid index of an existing dataset
    assert [i.record["unit"] for i in items][:3] == ["00000_toy_00000_v0", "00000_toy_00000_v1", "00001_toy_00001_v0"]
    source = read_index(setup["data"] / "index_.jsonl")
    for item in items:
        original = source[int(item.record["unit"][:5])]
        assert item.prompt == original.prompt
        # The label is the conditioning mask, unchanged (64 px in, 64 px out).
        assert np.array_equal(pixels(work / item.source), pixels(setup["data"] / original.source))
        assert Image.open(work / item.target).size == (64, 64)
        assert (work / "debug" / Path(item.target).name).is_file()
    assert (work / "classes.json").is_file()

    capsys.readouterr()
    again = run(setup, work, "--num_per_mask", "2", "--batch_size", "3", "--guidance_scale", "2.0")
    assert again["synthesized"] == 0 and again["done_before"] == 10
    out = capsys.readouterr().out
    assert "(0 now, 10 before" in out and "nan" not in out  # nothing sampled: no rate
    (work / "img" / "00003_toy_00003_v1.png").unlink()  # a file lost after its index line was written
    repaired = run(setup, work, "--num_per_mask", "2", "--batch_size", "3", "--guidance_scale", "2.0")
    assert repaired["synthesized"] == 1
    assert len(read_index(work / "index.jsonl")) == 10


def test_an_item_does_not_depend_on_the_batch(setup, tmp_path):
    run(setup, tmp_path / "one", "--batch_size", "1")
    run(setup, tmp_path / "four", "--batch_size", "4")
    names = sorted(p.name for p in (tmp_path / "one" / "img").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "four" / "img").iterdir()) and len(names) == 5
    for name in names:
        difference = np.abs(pixels(tmp_path / "one" / "img" / name) - pixels(tmp_path / "four" / "img" / name))
        assert difference.max() <= 1, name  # at most a rounding step from batched arithmetic
    first, second = (pixels(tmp_path / "one" / "img" / n) for n in names[:2])
    assert np.abs(first - second).mean() > 1  # different seeds per item


def test_a_bad_item_is_named_and_the_rest_is_kept(setup, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("img", "label"):
        (data / sub).symlink_to(setup["data"] / sub)
    lines = (setup["data"] / "index_.jsonl").read_text().splitlines()
    broken = json.loads(lines[1]) | {"source": "bad.png"}
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(data / "bad.png")  # class 7 >= num_cls 6
    (data / "index_.jsonl").write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n")
    args = cli(setup, tmp_path / "out", "--batch_size", "2")
    args[args.index("--data_root") + 1] = str(data)
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")  # one line on stderr, the rest of the run went on
    assert "index_.jsonl:2" in err[0] and "class id(s) [7] >= num_cls=6" in err[0]
    assert len(read_index(tmp_path / "out" / "index.jsonl")) == 4


def test_checkpoint_with_other_num_cls_is_refused(setup, tmp_path, capsys):
    args = cli(setup, tmp_path / "out")
    args[args.index("--num_cls") + 1] = "7"
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "trained with num_cls=6" in err[0]
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_other_mask_encoding_is_refused(setup, tmp_path, capsys):
    assert build_parser().parse_args(cli(setup, tmp_path / "out")).mask_encoding is None  # default: the checkpoint's
    assert main(cli(setup, tmp_path / "out", "--mask_encoding", "onehot")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "trained with --mask_encoding grey, not --mask_encoding onehot" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_mask_guidance_is_refused_without_mask_dropout_or_beside_text_guidance(setup, tmp_path, capsys):
    """The fixture's checkpoint was trained without --mask_dropout: its null-mask branch is untrained."""
    assert main(cli(setup, tmp_path / "out", "--mask_guidance_scale", "2")) == 2
    assert "trained without --mask_dropout" in capsys.readouterr().err
    assert main(cli(setup, tmp_path / "out", "--mask_guidance_scale", "2", "--guidance_scale", "2")) == 2
    assert "one guidance at a time" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_crfm_path_changes_images_and_traces_losses(setup, tmp_path, monkeypatch):
    import crfm.segmentation.adapter

    monkeypatch.setattr(crfm.segmentation.adapter, "load_segmentor", lambda *a, **k: ColourSegmentor())
    run(setup, tmp_path / "plain")
    summary = run(setup, tmp_path / "crfm", "--mmseg_config", "x.py", "--mmseg_ckpt", "x.pth", "--max_step_size", "0.5")
    assert summary["crfm"] and summary["synthesized"] == 5
    trace = [json.loads(x) for x in (tmp_path / "crfm" / "crfm_trace.rank0.jsonl").read_text().splitlines()]
    assert sorted({t["step"] for t in trace}) == [0, 1, 2, 3]  # default rectified_step 4 of 4 steps
    assert all(json.loads(x)["crfm"] for x in (tmp_path / "crfm" / "index.jsonl").read_text().splitlines())
    name = "00000_toy_00000_v0.png"
    assert np.abs(pixels(tmp_path / "crfm" / "img" / name) - pixels(tmp_path / "plain" / "img" / name)).max() > 0


def test_two_processes_share_the_work(setup, tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "configs" / "accelerate_cpu_2proc.yaml"), str(REPO / "test.py"),
        *cli(setup, tmp_path, "--num_per_mask", "2"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shards = [
        {json.loads(x)["unit"] for x in (tmp_path / f"index.rank{r}.jsonl").read_text().splitlines()} for r in (0, 1)
    ]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 10 == len(read_index(tmp_path / "index.jsonl"))
