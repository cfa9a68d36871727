"""Every entry point meets every kind of bad input it reads and ends in one line naming it, writing nothing.

Each row runs an entry point in-process through its `main(argv)` against one damaged input (a truncated safetensors
of each kind crfm reads, a corrupt JSON record, a corrupt PNG) or a number out of range, and checks the exit status,
that stderr is the single `error: <path or flag>: <what>` line, and that no file appeared or changed anywhere the
run could write. test.py and crfm.reflow keep their documented contract for a bad *item* of the index (its one line,
exit status 1, the other items made), so those rows check that only that item is missing.

Then a work folder as a contract (issue #28): a torn progress record resumed byte-identical to an uninterrupted run,
a changed setting and a second live process refused in one line, a full disk (simulated in-process, and a real
tmpfs where the machine allows one) named in one line with a re-run that continues.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, TOY_SEGFORMER, vectorized_toy_data

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


def filter_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    """crfm.segmentation.filter on the toy pairs as real and synthetic set; the segmentor is loaded only after
    every pair is checked (its weights do not exist)."""
    return [
        "--data_root", str(inputs["data"]), "--num_cls", "6", "--mmseg_config", str(TOY_SEGFORMER),
        "--mmseg_ckpt", str(inputs["root"] / "no_segmentor.pth"), "--synth_root", str(inputs["data"]),
        "--work_dir", str(work), "--no_progress", "--device", "cpu",
    ]  # fmt: skip


def hardness_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    return [
        "--data_root", str(inputs["data"]), "--num_cls", "6", "--mmseg_config", str(TOY_SEGFORMER),
        "--mmseg_ckpt", str(inputs["root"] / "no_segmentor.pth"), "--out", str(work / "counts.json"),
        "--no_progress", "--device", "cpu",
    ]  # fmt: skip


def layouts_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    return ["--data_root", str(inputs["data"]), "--work_dir", str(work), "--num_layouts", "2", "--no_progress"]


def downstream_argv(inputs: dict[str, Path], work: Path) -> list[str]:
    return [
        "--data_root", str(inputs["data"]), "--val_file", "index.jsonl", "--work_dir", str(work), "--num_cls", "6",
        "--max_iters", "2", "--batch_size", "1", "--device", "cpu", "--no_progress",
    ]  # fmt: skip


def too_large(inputs: dict[str, Path]) -> str:
    """One patch per side more than the base's position grid holds (read from its configs)."""
    vae = json.loads((inputs["pipe"] / "vae" / "config.json").read_text())
    transformer = json.loads((inputs["pipe"] / "transformer" / "config.json").read_text())
    step = 2 ** (len(vae["block_out_channels"]) - 1) * transformer["patch_size"]
    return str(step * (transformer["pos_embed_max_size"] + 1))


def resolution(argv: Callable[[dict[str, Path], Path], list[str]], value: str) -> Callable:
    """`argv` at another --resolution ('too large': `too_large`)."""

    def build(inputs: dict[str, Path], work: Path) -> list[str]:
        out = argv(inputs, work)
        out[out.index("--resolution") + 1] = too_large(inputs) if value == "too large" else value
        return out

    return build


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
        "crfm.segmentation.filter": "crfm.segmentation.filter",
        "crfm.segmentation.hardness": "crfm.segmentation.hardness",
        "crfm.data.layouts": "crfm.data.layouts",
        "crfm.segmentation.downstream": "crfm.segmentation.downstream",
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
    # A side the base cannot make (not a multiple of VAE factor x patch; beyond its position grid): refused before
    # any model loads or any file (img/, logs/, loss.jsonl, latents.json) is made.
    Case("test.py", "none", resolution(sampling_argv, "63"), "--resolution"),
    Case("test.py", "none", resolution(sampling_argv, "too large"), "--resolution"),
    Case("crfm.reflow", "none", resolution(sampling_argv, "too large"), "--resolution"),
    Case("train.py", "none", resolution(train_argv, "63"), "--resolution"),
    Case(
        "crfm.training.cache_latents",
        "none",
        resolution(lambda inputs, work: [*model_data_argv(inputs), "--work_dir", str(work)], "63"),
        "--resolution",
    ),
    Case("crfm.evaluate_sampling", "none", resolution(evaluate_argv, "63"), "--resolution"),
    # Counts, seeds and step sizes out of range, refused when parsed (numpy's seeds must be >= 0).
    Case("crfm.segmentation.hardness", "none", flag(hardness_argv, "--min_per_mask", "-1"), "--min_per_mask"),
    Case("crfm.data.layouts", "none", flag(layouts_argv, "--seed", "-1"), "--seed"),
    Case("test.py", "none", flag(sampling_argv, "--max_step_size", "-1"), "--max_step_size"),
    # A colour mask, a class id >= num_cls: the index line and the file at fault, before a model loads.
    *(
        Case(entry, damage, argv, "index.jsonl:1 (img/")
        for entry, argv in (
            ("crfm.segmentation.filter", filter_argv),
            ("crfm.segmentation.hardness", hardness_argv),
            ("crfm.data.layouts", layouts_argv),
            ("crfm.segmentation.downstream", downstream_argv),
        )
        for damage in ("rgb label", "class id")
    ),
    # A missing segmentor config is named first (not `[Errno 2] ...` or mmengine's `file "..." does not exist`).
    Case("crfm.segmentation.filter", "none", flag(filter_argv, "--mmseg_config", "{root}/no.py"), "no.py"),
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
    elif damage in ("rgb label", "class id"):  # the label of the index's first line
        from crfm.data.index import read_index

        label = inputs["data"] / read_index(inputs["data"] / "index.jsonl")[0].source
        with Image.open(label) as opened:
            array = np.array(opened)
        if damage == "class id":
            array[0, 0] = 9
            Image.fromarray(array).save(label)
        else:
            Image.fromarray(np.stack([array] * 3, axis=-1)).save(label)
    elif damage in ("image png", "mask png"):
        folder = "img" if damage == "image png" else "label"
        (inputs["data"] / folder / sorted(p.name for p in (inputs["data"] / folder).iterdir())[0]).write_bytes(
            b"\x89PNG\r\n\x1a\n truncated"
        )
    else:
        assert damage == "none"
    return inputs


def names_first(line: str) -> bool:
    """`error: <file or flag>: <what>`: what precedes the first ': ' starts with a flag or a path."""
    first = line.removeprefix("error: ").split(": ")[0].split()[0]
    return first.startswith("--") or "/" in first or "." in first


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
    assert names_first(lines[0]), where
    if case.status == 2:
        assert snapshot(tmp_path) == before, where  # nothing written, nothing changed
        assert not work.exists(), where
    else:  # one bad item of two: the other one made, the bad one not
        made = sorted(p.name for p in (work / "img").iterdir())
        assert len(made) == 1 and not made[0].startswith("00000_"), where


# A work folder is a contract: a torn progress record, a changed setting, a second live process, a full disk.


def run_entry(entry: str, argv: list[str], capfd) -> tuple[int, list[str]]:
    """`entry`'s exit status and stderr lines (stdout dropped)."""
    capfd.readouterr()
    status = entry_point(entry)(argv)
    return status, capfd.readouterr().err.splitlines()


def outputs(work: Path) -> dict[str, bytes]:
    """The bytes of every output a resumed run must reproduce (images, masks, latent shards, the index)."""
    kept = ("img", "label", "pairs")
    files = [p for p in work.rglob("*") if p.is_file() and p.relative_to(work).parts[0] in kept]
    return {str(p.relative_to(work)): p.read_bytes() for p in [*files, work / "index.jsonl"]}


@pytest.fixture(scope="module")
def reference(good, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of test.py and crfm.reflow on the sound inputs, one item per batch."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {"test.py": root / "synth", "crfm.reflow": root / "pairs"}
    for entry, work in runs.items():
        assert entry_point(entry)([*sampling_argv(good, work), "--batch_size", "1"]) == 0
    return runs


@pytest.mark.parametrize("entry", ["test.py", "crfm.reflow"])
def test_a_torn_progress_record_is_dropped_and_its_item_redone(good, reference, entry, tmp_path, capfd):
    work = tmp_path / "work"
    shutil.copytree(reference[entry], work)
    shard = work / "index.rank0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    shard.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # a full disk or a power cut mid-line
    (work / "index.jsonl").unlink()

    status, err = run_entry(entry, [*sampling_argv(good, work), "--batch_size", "1"], capfd)

    assert status == 0 and err == [], err  # was: error: Unterminated string starting at ...
    assert outputs(work) == outputs(reference[entry])  # the torn item made again, byte-identical
    assert shard.read_text() == "".join(lines)  # the torn tail cut off, each item once


def test_a_changed_setting_is_refused_in_one_line_naming_it(good, reference, tmp_path, capfd):
    work = tmp_path / "work"
    shutil.copytree(reference["test.py"], work)
    before = snapshot(work)
    for extra, change in ((["--seed", "5"], "seed: 0 -> 5"), (["--guidance_scale", "2"], "guidance_scale: 1.0 -> 2.0")):
        status, err = run_entry("test.py", [*sampling_argv(good, work), *extra], capfd)
        assert status == 2 and len(err) == 1, err
        assert (
            err[0].startswith(f"error: {work}: holds synthesized images made with other settings (")
            and change in err[0]
        )
        assert snapshot(work) == before
    # The same settings (another batch size, which no image depends on) resume: nothing left to make.
    status, err = run_entry("test.py", [*sampling_argv(good, work), "--batch_size", "2"], capfd)
    assert status == 0 and err == [] and outputs(work) == outputs(reference["test.py"])


HOLD_LOCK = """
import sys, time
from crfm.utils.fileio import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_live_process_is_refused_and_a_dead_ones_lock_taken_over(good, reference, tmp_path, capfd):
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    work = tmp_path / "work"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(work)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )  # a test.py run holds the folder as this one does
    try:
        assert first.stdout.readline().strip() == "held"
        before = snapshot(work)
        status, err = run_entry("test.py", [*sampling_argv(good, work), "--batch_size", "1"], capfd)
        assert status == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {work}: in use by process {first.pid} on "), err
        assert snapshot(work) == before  # nothing written
    finally:
        first.kill()  # SIGKILL: its lock file stays behind
        first.wait()
    status, err = run_entry("test.py", [*sampling_argv(good, work), "--batch_size", "1"], capfd)
    assert status == 0 and err == [], err
    assert outputs(work) == outputs(reference["test.py"])


def test_a_full_disk_is_one_line_and_a_rerun_continues(good, reference, tmp_path, monkeypatch, capfd):
    import errno

    work = tmp_path / "work"
    save, calls = Image.Image.save, []

    def fills_the_disk(image, fp, *args, **kwargs):  # the third PNG (the second unit's image) meets a full disk
        calls.append(fp)
        if len(calls) == 3:
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fills_the_disk)
    status, err = run_entry("test.py", [*sampling_argv(good, work), "--batch_size", "1"], capfd)
    monkeypatch.undo()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {work}/img/00001_") and err[0].endswith(": no space left on device"), err
    assert len((work / "index.rank0.jsonl").read_text().splitlines()) == 1  # the first unit stands
    assert not list((work / "img").glob(".*"))  # no half-written temporary left

    status, err = run_entry("test.py", [*sampling_argv(good, work), "--batch_size", "1"], capfd)  # space freed
    assert status == 0 and err == [], err
    assert outputs(work) == outputs(reference["test.py"])


def test_a_full_disk_while_checkpointing_is_one_line_and_training_resumes(good, tmp_path, monkeypatch, capfd):
    """train.py: safetensors says `os error 28` while a checkpoint is written; the run ends in one line naming the
    file, and the same command after freeing space ends with the uninterrupted run's losses and weights."""
    import crfm.models.trained_weights as trained_weights

    argv = [*train_argv(good, tmp_path / "reference"), "--max_train_steps", "2", "--checkpointing_steps", "1"]
    assert entry_point("train.py")(argv) == 0
    work = tmp_path / "work"
    argv = [*train_argv(good, work), "--max_train_steps", "2", "--checkpointing_steps", "1"]
    argv += ["--resume_from_checkpoint", "latest"]
    save_file, calls = trained_weights.save_file, []

    def fills_the_disk(tensors, path, *args, **kwargs):  # the second checkpoint meets a full disk
        calls.append(path)
        if len(calls) == 2:
            raise Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull }) (os error 28)")
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(trained_weights, "save_file", fills_the_disk)
    status, err = run_entry("train.py", argv, capfd)
    monkeypatch.undo()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {work}/checkpoints/") and err[0].endswith(": no space left on device"), err
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["checkpoint-1"]  # the failed save is gone

    status, err = run_entry("train.py", argv, capfd)
    assert status == 0, err
    assert (work / "loss.jsonl").read_text() == (tmp_path / "reference" / "loss.jsonl").read_text()
    for name in ("model.safetensors",):
        assert (work / "final" / name).read_bytes() == (tmp_path / "reference" / "final" / name).read_bytes()


def test_a_real_full_disk_is_one_line_and_a_rerun_after_freeing_space_continues(good, reference, tmp_path):
    """test.py on a tmpfs with room for about half its output (a private mount namespace: nothing outside sees it),
    then the same command after the tmpfs is grown."""
    import subprocess

    from tests.helpers import subprocess_env

    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs here (unshare -rm + mount): {probe.stderr.decode().strip()[-200:]}")
    made = sum(p.stat().st_size for p in reference["test.py"].rglob("*") if p.is_file())
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    command = " ".join(["python", str(REPO / "test.py"), *sampling_argv(good, disk / "work"), "--batch_size", "1"])
    script = (
        f"mount -t tmpfs -o size={4096 * (made // 2 // 4096 + 1)} tmpfs {disk} && "
        f"{{ {command}; echo status=$? >&2; }} && mount -o remount,size=16m {disk} && "
        f"{{ {command}; echo status=$? >&2; }} && cp -r {disk / 'work'} {copy}"
    )
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=subprocess_env())
    lines = [line for line in run.stderr.splitlines() if line.startswith(("error:", "status=", "Traceback"))]
    assert lines[:3] == [lines[0], "status=2", "status=0"], run.stderr[-3000:]
    assert lines[0].startswith(f"error: {disk}/work/") and lines[0].endswith(": no space left on device"), lines
    assert outputs(copy) == outputs(reference["test.py"])
