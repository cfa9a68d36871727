"""crfm.downstream: the real + synthetic mixing sampler and segmentor training on two datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import REPO

pytest.importorskip("mmseg")

from crfm.segmentation.mmseg_ext import MixedSourceSampler  # noqa: E402
from crfm.toy.toydata import write_dataset  # noqa: E402

SIZE = 64


class _Concat:
    """What the sampler reads from mmengine's ConcatDataset: `datasets` and `len`."""

    def __init__(self, *sizes: int) -> None:
        self.datasets = [range(n) for n in sizes]

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)


def _take(sampler: MixedSourceSampler, n: int) -> list[int]:
    stream = iter(sampler)
    return [next(stream) for _ in range(n)]


def test_mixing_ratio_is_independent_of_sizes():
    # 10 real, 90 synthetic: plain concatenation would draw 90% synthetic; the sampler draws 25%.
    indices = _take(MixedSourceSampler(_Concat(10, 90), weights=[0.75, 0.25], seed=0), 8000)
    synthetic = sum(i >= 10 for i in indices) / len(indices)
    assert abs(synthetic - 0.25) < 0.02
    assert set(indices) == set(range(100))


def test_each_source_cycles_through_a_permutation():
    indices = _take(MixedSourceSampler(_Concat(7, 5), weights=[1, 1], seed=3), 400)
    real = [i for i in indices if i < 7]
    synthetic = [i - 7 for i in indices if i >= 7]
    for stream, size in ((real, 7), (synthetic, 5)):
        for begin in range(0, len(stream) - size + 1, size):
            assert sorted(stream[begin : begin + size]) == list(range(size))  # every item once per cycle


def test_zero_weight_source_is_never_drawn_and_seed_repeats():
    sampler = MixedSourceSampler(_Concat(6, 4), weights=[1.0, 0.0], seed=1)
    first = _take(sampler, 200)
    assert max(first) < 6 and Counter(first)[0] > 0
    assert _take(MixedSourceSampler(_Concat(6, 4), weights=[1.0, 0.0], seed=1), 200) == first


def test_ranks_split_one_stream():
    whole = _take(MixedSourceSampler(_Concat(6, 4), weights=[1, 1], seed=5), 40)
    shards = []
    for rank in range(2):
        sampler = MixedSourceSampler(_Concat(6, 4), weights=[1, 1], seed=5)
        sampler.rank, sampler.world_size = rank, 2
        shards.append(_take(sampler, 20))
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


@pytest.mark.parametrize(
    ("weights", "sizes", "match"),
    [([1.0], (3, 3), "2 datasets"), ([-1.0, 2.0], (3, 3), ">= 0"), ([1.0, 1.0], (3, 0), "empty")],
)
def test_sampler_rejects_bad_weights(weights, sizes, match):
    with pytest.raises(ValueError, match=match):
        MixedSourceSampler(_Concat(*sizes), weights=weights, seed=0)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def _train(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "train_segmentor.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.fixture(scope="module")
def real_and_synthetic(tmp_path_factory) -> tuple[Path, Path]:
    real = tmp_path_factory.mktemp("real")
    lines = write_dataset(real, 8, SIZE, seed=11).read_text().splitlines(keepends=True)
    (real / "train.jsonl").write_text("".join(lines[:6]))
    (real / "val.jsonl").write_text("".join(lines[6:]))
    synthetic = tmp_path_factory.mktemp("synthetic")  # stands in for a test.py work dir: same layout
    write_dataset(synthetic, 10, SIZE, seed=12)
    return real, synthetic


def test_training_on_real_plus_synthetic(real_and_synthetic, tmp_path):
    real, synthetic = real_and_synthetic
    work = tmp_path / "mixed"
    proc = _train(
        "--data_root", real, "--train_file", "train.jsonl", "--val_file", "val.jsonl", "--work_dir", work,
        "--synth_root", synthetic, "--synth_ratio", 0.5, "--max_iters", 4, "--batch_size", 2, "--img_size", SIZE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 real + 10 synthetic" in proc.stdout
    metrics = json.loads((work / "metrics.json").read_text())
    assert (metrics["real_train"], metrics["synthetic_train"], metrics["synth_ratio"]) == (6, 10, 0.5)
    assert metrics["iters"] == 4 and 0 <= metrics["mIoU"] <= 100
    # The dumped config rebuilds the same training set on its own (custom_imports names the sampler's module).
    code = (
        "from mmengine.config import Config; from mmengine.registry import init_default_scope;"
        "from mmseg.registry import DATASETS, DATA_SAMPLERS; import sys;"
        f"cfg = Config.fromfile({str(work / 'config.py')!r}); init_default_scope('mmseg');"
        "ds = DATASETS.build(cfg.train_dataloader.dataset);"
        "s = DATA_SAMPLERS.build(cfg.train_dataloader.sampler, default_args=dict(dataset=ds, seed=0));"
        "print(type(s).__name__, [len(d) for d in ds.datasets])"
    )
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "MixedSourceSampler [6, 10]" in check.stdout


def _error(proc: subprocess.CompletedProcess) -> str:
    """A refused run: exit status 2 and one `error: ...` line on stderr."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    return proc.stderr


def test_bad_mixing_arguments_are_refused(real_and_synthetic, tmp_path):
    real, synthetic = real_and_synthetic
    proc = _train("--data_root", real, "--work_dir", tmp_path / "a", "--synth_ratio", 0.5)
    assert "--synth_ratio needs --synth_root" in _error(proc)
    proc = _train("--data_root", real, "--work_dir", tmp_path / "b", "--synth_root", synthetic, "--synth_ratio", 1)
    assert "[0, 1)" in _error(proc)
    proc = _train("--data_root", real, "--work_dir", tmp_path / "c", "--synth_root", tmp_path / "none")
    assert "--synth_root: no index" in _error(proc)
    proc = _train("--data_root", real, "--json_file", "train.jsonl", "--work_dir", tmp_path / "d", "--num_cls", 5)
    assert "lists 6 classes but the class count is 5" in _error(proc)
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before anything was written


def test_flags_aliases_and_library_errors(real_and_synthetic, tmp_path):
    """--config/--train_file are the earlier names of --mmseg_config/--json_file; build_config raises, never exits."""
    from crfm.segmentation.downstream import DEFAULT_CONFIG, build_config, build_parser, parse_args
    from crfm.utils.flags import UsageError

    real, _ = real_and_synthetic
    base = ["--data_root", str(real), "--work_dir", str(tmp_path)]
    args = build_parser().parse_args(base)
    assert (args.mmseg_config, args.json_file) == (str(DEFAULT_CONFIG), "index.jsonl")
    assert (args.seed, args.device) == (None, "auto")  # None: the config's seed
    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.parent.name == "configs"  # package data, not the checkout
    old = build_parser().parse_args([*base, "--config", "c.py", "--train_file", "train.jsonl"])
    new = build_parser().parse_args([*base, "--mmseg_config", "c.py", "--json_file", "train.jsonl"])
    assert vars(old) == vars(new) and new.mmseg_config == "c.py" and new.json_file == "train.jsonl"
    cfg = build_config(parse_args([*base, "--json_file", "train.jsonl", "--seed", "7", "--max_iters", "3"]))
    assert cfg.train_dataloader.dataset.ann_file == "train.jsonl" and cfg.randomness.seed == 7
    assert cfg.model.decode_head.num_classes == 6 and cfg.train_cfg.max_iters == 3
    with pytest.raises(UsageError, match="--data_root: no index at"):
        build_config(parse_args([*base, "--json_file", "missing.jsonl"]))
    with pytest.raises(SystemExit):  # a bad flag combination is argparse's usage error, as before
        parse_args([*base, "--synth_ratio", "0.5"])
