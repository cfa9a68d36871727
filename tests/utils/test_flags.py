"""crfm.utils.flags: every entry point reports a bad input as one `error: ...` line with exit status 2, the shared
flags mean the same everywhere (the index flag's earlier names included), and the dtype follows accelerate."""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crfm.utils.flags import INDEX_FLAG_ALIASES, UsageError, resolve_device, resolve_dtype
from tests.helpers import REPO, subprocess_env

# -------------------------------------------------------------------------------------------------- exit paths

MISSING = "missing"  # a folder that never exists, below each test's tmp dir


def _bad_runs(tmp: Path) -> dict[str, list[str]]:
    """Entry point -> a command line that must fail before any model loads (a missing index, folder or flag)."""
    nodata = str(tmp / MISSING)
    model = ["--pretrained_model_name_or_path", str(tmp / "no_model")]
    data = ["--data_root", nodata, "--vectors_path", str(tmp / "no_vectors"), "--num_cls", "6"]
    return {
        "train.py": [str(REPO / "train.py"), *model, *data, "--work_dir", str(tmp / "train")],
        "test.py": [
            str(REPO / "test.py"), *model, "--lora_ckpt", str(tmp / "no_ckpt"), *data, "--work_dir", str(tmp / "syn")
        ],
        "preprocess/vectorize.py": [
            str(REPO / "preprocess" / "vectorize.py"), *model, "--data_root", nodata, "--work_dir", str(tmp / "vec")
        ],
        "scripts/train_segmentor.py": [
            str(REPO / "scripts" / "train_segmentor.py"), "--data_root", nodata, "--work_dir", str(tmp / "seg")
        ],
        "crfm.segmentation.evaluate": [
            "-m", "crfm.segmentation.evaluate", "--data_root", nodata, "--num_cls", "6",
            "--mmseg_config", str(tmp / "no_config.py"), "--mmseg_ckpt", str(tmp / "no_ckpt.pth"),
        ],
        "crfm.data.make_index": ["-m", "crfm.data.make_index", nodata, "--no_progress"],
        "crfm.toy.tiny": ["-m", "crfm.toy.tiny", str(tmp / "tiny"), "--fit_vae_on", str(tmp / MISSING / "index.jsonl")],
        "crfm.toy.toydata": ["-m", "crfm.toy.toydata", str(tmp / MISSING / "toy")],  # OUT without --num
        "crfm.toy.demo": ["-m", "crfm.toy.demo", "--out", str(tmp / "demo"), "--preset", "ci", "--test_scenes", "0"],
    }  # fmt: skip


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every entry point's bad run, started together (each mostly waits on imports) from an empty folder."""
    tmp = tmp_path_factory.mktemp("bad_runs")
    cwd = tmp_path_factory.mktemp("cwd")  # no checkout here: each must find crfm through PYTHONPATH alone
    running = {}
    for name, args in _bad_runs(tmp).items():
        running[name] = (
            subprocess.Popen(
                [sys.executable, *args],
                cwd=cwd,
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            args,
        )
    results = {}
    for name, (proc, args) in running.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (subprocess.CompletedProcess(args, proc.returncode, out, err), tmp)
    return results


@pytest.mark.parametrize("entry_point", list(_bad_runs(Path("/x"))))
def test_bad_input_is_one_error_line_and_exit_2(bad_runs, entry_point):
    proc, tmp = bad_runs[entry_point]
    where = f"{entry_point}: rc={proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 2, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0] != "error: ", where
    assert proc.stdout == "", where
    assert not (tmp / MISSING).exists()  # nothing was made on the way to the error


def test_console_scripts_name_each_module_main():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {"crfm-train", "crfm-synthesize", "crfm-vectorize", "crfm-train-segmentor", "crfm-demo"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


# ------------------------------------------------------------------------------------------------ shared flags


@functools.cache
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every entry point's parser (none of these imports mmseg), built once, when a test first needs them."""
    modules = {
        "vectorize": "crfm.data.vectorize",
        "train": "crfm.training.train",
        "synthesis": "crfm.sampling.synthesis",
        "downstream": "crfm.segmentation.downstream",
        "evaluate": "crfm.segmentation.evaluate",
        "make_index": "crfm.data.make_index",
        "tiny": "crfm.toy.tiny",
        "toydata": "crfm.toy.toydata",
        "demo": "crfm.toy.demo",
    }
    return {name: importlib.import_module(module).build_parser() for name, module in modules.items()}


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """A minimal command line: a dummy value for every required option and positional."""
    argv = []
    for action in parser._actions:  # argparse has no public accessor for its actions
        value = "1" if getattr(action.type, "kind", action.type) in (int, float) else "x"  # bounded types: kind
        if not action.option_strings:
            argv.append(value)
        elif action.required:
            argv += [action.option_strings[0], value]
    return argv


WITH_INDEX_FLAG = {"vectorize", "train", "synthesis", "downstream", "evaluate"}


def test_index_flag_and_its_earlier_names_set_one_dest():
    found = {name for name, parser in parsers().items() if "--json_file" in parser._option_string_actions}
    assert found == WITH_INDEX_FLAG
    for name in sorted(found):
        parser = parsers()[name]
        action = parser._option_string_actions["--json_file"]
        assert action.dest == "json_file", name
        for alias in INDEX_FLAG_ALIASES:
            assert parser._option_string_actions[alias] is action, (name, alias)
            args = parser.parse_args([*_required(parser), alias, "mine.jsonl"])
            assert args.json_file == "mine.jsonl" and not hasattr(args, alias.lstrip("-")), (name, alias)
        assert parser.parse_args([*_required(parser), "--json_file", "mine.jsonl"]).json_file == "mine.jsonl"


@pytest.mark.parametrize(
    ("flag", "dest"),
    [("--seed", "seed"), ("--device", "device"), ("--no_progress", "no_progress"), ("--data_root", "data_root")]
    + [("--num_cls", "num_cls"), ("--mixed_precision", "mixed_precision"), ("--mmseg_config", "mmseg_config")],
)
def test_shared_flags_have_one_dest_everywhere(flag, dest):
    for name, parser in parsers().items():
        action = parser._option_string_actions.get(flag)
        if action is not None:
            assert action.dest == dest, (name, flag)
            if flag == "--device":
                assert action.default == "auto", name


def test_downstream_config_flag_keeps_its_earlier_name():
    parser = parsers()["downstream"]
    assert parser._option_string_actions["--config"] is parser._option_string_actions["--mmseg_config"]


TINY_HYPHENATED = [
    ("--sample-size", "8"), ("--patch-size", "2"), ("--head-dim", "8"), ("--dual-attention-layers", "0,1"),
    ("--vae-channels", "8,16"), ("--latent-channels", "4"), ("--clip-l-dim", "16"), ("--clip-g-dim", "16"),
    ("--t5-dim", "64"), ("--text-layers", "1"), ("--pos-embed-max-size", "8"), ("--fit-vae-on", "i.jsonl"),
    ("--vae-steps", "3"), ("--vae-size", "32"),
]  # fmt: skip


@pytest.mark.parametrize(("parser_name", "flag", "value"), [("tiny", *f) for f in TINY_HYPHENATED]
                         + [("toydata", "--ignore-prob", "0.5")])  # fmt: skip
def test_hyphenated_spellings_still_parse(parser_name, flag, value):
    parser = parsers()[parser_name]
    snake = "--" + flag[2:].replace("-", "_")
    assert parser._option_string_actions[flag] is parser._option_string_actions[snake]
    base = _required(parser)
    assert vars(parser.parse_args([*base, flag, value])) == vars(parser.parse_args([*base, snake, value]))


# -------------------------------------------------------------------------------------------- dtype and device


def test_resolve_dtype_follows_accelerate_unless_the_flag_is_given(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_dtype(None) == torch.float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_dtype(None) == torch.bfloat16  # the flag unset: what `accelerate launch` was configured with
    assert resolve_dtype("fp16") == torch.float16  # the flag given: it wins
    assert resolve_dtype("no") == torch.float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UsageError, match="fp8"):
        resolve_dtype(None)


def test_resolve_dtype_via_the_parsers(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    for name in ("vectorize", "train", "synthesis"):
        parser = parsers()[name]
        assert resolve_dtype(parser.parse_args(_required(parser)).mixed_precision) == torch.float16, name
        args = parser.parse_args([*_required(parser), "--mixed_precision", "bf16"])
        assert resolve_dtype(args.mixed_precision) == torch.bfloat16, name


def test_resolve_device_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("1") == resolve_device(1) == torch.device("cuda:1")  # the original scripts' GPU number
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
