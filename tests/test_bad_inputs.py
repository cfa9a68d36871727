"""Every entry point meets every kind of bad input it reads and ends in one line naming it, writing nothing.

Each row runs an entry point in-process through its `main(argv)` against one damaged input (a truncated safetensors
of each kind crfm reads, a corrupt JSON record, a corrupt PNG) or a number out of range, and checks the exit status,
that stderr is the single `error: <path or flag>: <what>` line, and that no file appeared or changed anywhere the
run could write. test.py and crfm.reflow keep their documented contract for a bad *item* of the index (its one line,
exit status 1, the other items made), so those rows check that only that item is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, vectorized_toy_data

RESOLUTION = 64  # the tiny pipeline's 8x8 latents


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def truncate(path: Path) -> None:
    """Cut a file to half its bytes, as a copy or a write killed half-way leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def good(tiny_sd35_dir, trained_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Sound inputs of every kind: toy data with prompt vectors, a trained checkpoint with EMA weights, reflow pairs
    and a latent cache made from them."""
    from safetensors.torch import load_file, save_file

    from crfm.fewstep.pairs import main as pairs_main
    from crfm.training.cache_latents import main as cache_main

    root = tmp_path_factory.mktemp("bad_inputs_good")
    found = {**vectorized_toy_data(root, tiny_sd35_dir, num=2, size=RESOLUTION, seed=3), "root": root}
    found["ckpt"] = root / "ckpt"
    shutil.copytree(trained_checkpoint, found["ckpt"])
    weights = load_file(str(found["ckpt"] / "model.safetensors"))
    save_file(weights, str(found["ckpt"] / "ema.safetensors"), metadata={"optimization_step": "1"})
    found["pairs"] = root / "pairs"
    assert pairs_main([*sampling_argv(found, found["pairs"]), "--sigma_grid", "uniform"]) == 0
    found["cache"] = root / "cache"
    assert cache_main([*model_data_argv(found), "--mask_encoding", "grey", "--flip_prob", "0",
                       "--work_dir", str(found["cache"])]) == 0  # fmt: skip
    return found


def model_data_argv(inputs: dict[str, Path]) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(inputs["pipe"]), "--data_root", str(inputs["data"]),
        "--json_file", "index_.jsonl", "--num_cls", "6", "--resolution", str(RESOLUTION), "--no_progress",
    ]  # fmt: skip


def sampling_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    """test.py's (and crfm.reflow's) command line on `inputs`, two steps."""
    return [
        *model_data_argv(inputs), "--vectors_path", str(inputs["vectors"]), "--lora_ckpt", str(inputs["ckpt"]),
        "--work_dir", str(work), "--num_inference_steps", "2",
    ]  # fmt: skip


def train_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    return [
        *model_data_argv(inputs), "--vectors_path", str(inputs["vectors"]), "--work_dir", str(work),
        "--mask_encoding", "grey", "--max_train_steps", "1", "--report_to", "none",
    ]  # fmt: skip


def evaluate_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    """crfm.evaluate_sampling; the judge is never loaded before the masks and the checkpoint are read."""
    return [
        *model_data_argv(inputs), "--vectors_path", str(inputs["vectors"]), "--lora_ckpt", str(inputs["ckpt"]),
        "--judge_config", str(REPO / "crfm/segmentation/configs/toy_segformer.py"),
        "--judge_ckpt", str(inputs["root"] / "no_judge.pth"), "--work_dir", str(work), "--device", "cpu",
        "--runs", "euler:1",
    ]  # fmt: skip


def entry_point(name: str) -> Callable[[list[str]], int]:
    import importlib

    module = {
        "train.py": "crfm.training.train",
        "test.py": "crfm.sampling.synthesis",
        "crfm.reflow": "crfm.fewstep.pairs",
        "crfm.evaluate_sampling": "crfm.fewstep.evaluate",
        "preprocess/vectorize.py": "crfm.data.vectorize",
        "crfm.training.cache_latents": "crfm.training.cache_latents",
        "crfm.toy.tiny": "crfm.toy.tiny",
        "crfm.toy.toydata": "crfm.toy.toydata",
        "crfm.data.make_index": "crfm.data.make_index",
    }[name]
    return importlib.import_module(module).main


@dataclass(frozen=True)
class Case:
    entry: str
    damage: str  # which input is broken (a key of the copied inputs) and how: see `damaged_inputs`
    argv: Callable[[dict[str, Path], Path], list[str]]
    names: str  # what the error line must name: a file name, or the flag
    status: int = 2


def flag(argv: Callable[[dict[str, Path], Path], list[str]], *extra: str) -> Callable[[dict[str, Path], Path], list]:
    return lambda inputs, work: [*argv(inputs, work), *extra]


CASES = [
    # A trained checkpoint's weights, its EMA, its record.
    Case("test.py", "model.safetensors", sampling_argv, "model.safetensors"),
    Case("test.py", "ema.safetensors", sampling_argv, "ema.safetensors"),
    Case("test.py", "crfm_checkpoint.json", sampling_argv, "crfm_checkpoint.json"),
    Case("crfm.reflow", "model.safetensors", sampling_argv, "model.safetensors"),
    Case("crfm.evaluate_sampling", "model.safetensors", evaluate_argv, "model.safetensors"),
    Case("crfm.evaluate_sampling", "ema.safetensors", evaluate_argv, "ema.safetensors"),
    Case("train.py", "ema.safetensors", flag(train_argv, "--init_ckpt", "{ckpt}"), "ema.safetensors"),
    # Prompt vectors (an item's and the empty prompt's), reflow pair shards, cached latents, their records.
    Case("train.py", "0.safetensors", train_argv, "0.safetensors"),
    Case("train.py", "empty.safetensors", train_argv, "empty.safetensors"),
    Case("crfm.evaluate_sampling", "0.safetensors", evaluate_argv, "0.safetensors"),
    Case("train.py", "pair shard", flag(train_argv, "--reflow_pairs", "{pairs}"), "pairs/"),
    Case("train.py", "reflow_pairs.json", flag(train_argv, "--reflow_pairs", "{pairs}"), "reflow_pairs.json"),
    Case("train.py", "cached latents", flag(train_argv, "--latents_path", "{cache}", "--flip_prob", "0"), "cache/0"),
    Case("train.py", "latents.json", flag(train_argv, "--latents_path", "{cache}", "--flip_prob", "0"), "latents.json"),
    # A corrupt PNG (an image; a mask).
    Case("train.py", "image png", train_argv, ".png"),
    Case("crfm.evaluate_sampling", "mask png", evaluate_argv, ".png"),
    Case("test.py", "mask png", sampling_argv, ".png", status=1),  # a bad item: named, left out, the rest made
    Case("test.py", "0.safetensors", sampling_argv, "0.safetensors", status=1),
    # Numbers out of range, refused when parsed (before any folder is made).
    Case("test.py", "none", flag(sampling_argv, "--num_inference_steps", "-3"), "--num_inference_steps"),
    Case("test.py", "none", flag(sampling_argv, "--batch_size", "0"), "--batch_size"),
    Case("crfm.reflow", "none", flag(sampling_argv, "--segments", "0"), "--segments"),
    Case("train.py", "none", flag(train_argv, "--max_train_steps", "0"), "--max_train_steps"),
    Case("train.py", "none", flag(train_argv, "--flip_prob", "1.5"), "--flip_prob"),
    Case("train.py", "none", flag(train_argv, "--num_cls", "0"), "--num_cls"),
    Case("train.py", "none", flag(train_argv, "--prompt_dropout", "-0.1"), "--prompt_dropout"),
    Case("crfm.evaluate_sampling", "none", flag(evaluate_argv, "--limit", "0"), "--limit"),
    Case(
        "preprocess/vectorize.py",
        "none",
        lambda inputs, work: [
            "--pretrained_model_name_or_path",
            str(inputs["pipe"]),
            "--data_root",
            str(inputs["data"]),
            "--work_dir",
            str(work),
            "--batch_size",
            "0",
        ],
        "--batch_size",
    ),  # fmt: skip
    Case(
        "crfm.training.cache_latents",
        "none",
        lambda inputs, work: [*model_data_argv(inputs), "--work_dir", str(work), "--batch_size", "0"],
        "--batch_size",
    ),  # fmt: skip
    Case("crfm.toy.tiny", "none", lambda inputs, work: [str(work), "--layers", "0"], "--layers"),
    Case("crfm.toy.toydata", "none", lambda inputs, work: [str(work), "--num", "2", "--workers", "0"], "--workers"),
]


def damaged_inputs(good: dict[str, Path], damage: str, where: Path) -> dict[str, Path]:
    """A copy of the sound inputs in `where` with one of them damaged."""
    inputs = {key: where / path.relative_to(good["root"]) for key, path in good.items() if key != "pipe"}
    shutil.copytree(good["root"], where)
    inputs["pipe"] = good["pipe"]
    target = {
        "model.safetensors": inputs["ckpt"] / "model.safetensors",
        "ema.safetensors": inputs["ckpt"] / "ema.safetensors",
        "crfm_checkpoint.json": inputs["ckpt"] / "crfm_checkpoint.json",
        "0.safetensors": inputs["vectors"] / "0.safetensors",
        "empty.safetensors": inputs["vectors"] / "empty.safetensors",
        "reflow_pairs.json": inputs["pairs"] / "reflow_pairs.json",
        "cached latents": inputs["cache"] / "0.safetensors",
        "latents.json": inputs["cache"] / "latents.json",
    }
    if damage == "model.safetensors":  # a checkpoint saved without --use_ema: its weights are what loads
        (inputs["ckpt"] / "ema.safetensors").unlink()
    if damage in target:
        truncate(target[damage])
    elif damage == "pair shard":
        truncate(sorted((inputs["pairs"] / "pairs").iterdir())[0])
    elif damage in ("image png", "mask png"):
        folder = "img" if damage == "image png" else "label"
        (inputs["data"] / folder / sorted(p.name for p in (inputs["data"] / folder).iterdir())[0]).write_bytes(
            b"\x89PNG\r\n\x1a\n truncated"
        )
    else:
        assert damage == "none"
    return inputs


def snapshot(folder: Path) -> dict[str, int]:
    """Every file below `folder` with its size and modification time (what a write would change)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{case.entry} | {case.damage} | {case.names}" for case in CASES]
)  # fmt: skip
def test_bad_input_ends_in_one_line_naming_it_and_writes_nothing(good, case, tmp_path, capfd):
    inputs = damaged_inputs(good, case.damage, tmp_path / "inputs")
    work = tmp_path / "work"
    argv = [part.format(**{k: str(v) for k, v in inputs.items()}) for part in case.argv(inputs, work)]
    before = snapshot(tmp_path)
    capfd.readouterr()

    status = entry_point(case.entry)(argv)

    out, err = capfd.readouterr()
    where = f"{case.entry} {case.damage}: status {status}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    lines = err.splitlines()
    assert status == case.status, where
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    assert case.names in lines[0], where
    if case.status == 2:
        assert snapshot(tmp_path) == before, where  # nothing written, nothing changed
        assert not work.exists(), where
    else:  # one bad item of two: the other one made, the bad one not
        made = sorted(p.name for p in (work / "img").iterdir())
        assert len(made) == 1 and not made[0].startswith("00000_"), where
