"""crfm.downstream: the real + synthetic mixing sampler, segmentor training on two datasets, the real set's repeat
and exposure matching, and the packaged LoveDA config."""

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
LOVEDA_CONFIG = REPO / "crfm" / "segmentation" / "configs" / "loveda_segformer_b2.py"


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
        "--match_real_exposure",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 real + 10 synthetic" in proc.stdout
    assert "--match_real_exposure: 8 iterations instead of 4" in proc.stdout  # half the draws are real: twice as long
    metrics = json.loads((work / "metrics.json").read_text())
    assert (metrics["real_train"], metrics["synthetic_train"], metrics["synth_ratio"]) == (6, 10, 0.5)
    assert (metrics["iters"], metrics["max_iters_requested"], metrics["real_repeat"]) == (8, 4, 1)
    assert 0 <= metrics["mIoU"] <= 100
    # Each real image is drawn as often as in a real-only run of 4 iterations at batch 2 (4 * 2 / 6 times).
    assert metrics["real_draws_per_image"] == pytest.approx(4 * 2 / 6, abs=1e-3)
    assert metrics["synthetic_draws_per_image"] == pytest.approx(8 * 2 * 0.5 / 10, abs=1e-3)
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


def _config(real: Path, synthetic: Path, work_dir: Path, *flags: object):
    """build_config for the real train split + the synthetic set; no training."""
    from crfm.segmentation.downstream import build_config, parse_args

    base = ["--data_root", real, "--json_file", "train.jsonl", "--work_dir", work_dir, "--synth_root", synthetic]
    return build_config(parse_args([str(arg) for arg in (*base, *flags)]))


def test_real_repeat_draws_each_real_image_k_times_as_often(real_and_synthetic, tmp_path):
    from mmengine.dataset import InfiniteSampler
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    real, synthetic = real_and_synthetic
    cfg = _config(real, synthetic, tmp_path, "--real_repeat", 3)
    assert cfg.train_dataloader.sampler.type == "InfiniteSampler"  # drawn by concatenation, no mixing sampler
    init_default_scope("mmseg")
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(dataset) == 3 * 6 + 10
    stream = iter(InfiniteSampler(dataset, shuffle=True, seed=0))
    draws = Counter(dataset.get_data_info(next(stream))["img_path"] for _ in range(5 * len(dataset)))  # 5 passes
    real_paths = {path for path in draws if Path(path).is_relative_to(real.resolve())}
    assert len(real_paths) == 6 and len(draws) == 16
    assert {draws[path] for path in real_paths} == {15} and {draws[path] for path in draws.keys() - real_paths} == {5}
    # Without --real_repeat the training set is what it always was: [real, synthetic].
    assert len(_config(real, synthetic, tmp_path).train_dataloader.dataset.datasets) == 2


@pytest.mark.parametrize(
    ("flags", "iters"),
    [
        (["--synth_ratio", 0.3], round(100 / (1 - 0.3))),  # 143
        (["--real_repeat", 2], round(100 * (2 * 6 + 10) / (2 * 6))),  # 183: 6 real x 2 + 10 synthetic
        ([], round(100 * (6 + 10) / 6)),  # 267
    ],
)
def test_match_real_exposure_scales_the_schedule(real_and_synthetic, tmp_path, capsys, flags, iters):
    real, synthetic = real_and_synthetic
    cfg = _config(real, synthetic, tmp_path, "--max_iters", 100, "--match_real_exposure", *flags)
    assert cfg.train_cfg.max_iters == iters and cfg.param_scheduler[-1]["end"] == iters
    assert f"--match_real_exposure: {iters} iterations instead of 100" in capsys.readouterr().out
    assert _config(real, synthetic, tmp_path, "--max_iters", 100, *flags).train_cfg.max_iters == 100


def _error(proc: subprocess.CompletedProcess) -> str:
    """A refused run: exit status 2 and one `error: ...` line on stderr."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    return proc.stderr


def test_bad_mixing_arguments_are_refused(real_and_synthetic, tmp_path):
    real, synthetic = real_and_synthetic
    proc = _train("--data_root", real, "--work_dir", tmp_path / "a", "--synth_ratio", 0.5)
    assert "--synth_ratio needs --synth_root" in _error(proc)
    proc = _train("--data_root", real, "--work_dir", tmp_path / "b", "--synth_root", synthetic, "--synth_ratio", 1.5)
    assert "[0, 1]" in _error(proc)
    proc = _train("--data_root", real, "--work_dir", tmp_path / "b", "--synth_root", synthetic, "--synth_ratio", 1,
                  "--match_real_exposure")  # fmt: skip
    assert "no real image is drawn" in _error(proc)
    proc = _train("--data_root", real, "--work_dir", tmp_path / "c", "--synth_root", tmp_path / "none")
    assert "--synth_root: no index" in _error(proc)
    proc = _train("--data_root", real, "--json_file", "train.jsonl", "--work_dir", tmp_path / "d", "--num_cls", 5)
    assert "lists 6 classes but the class count is 5" in _error(proc)
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before anything was written


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--synth_root", "SYNTH", "--real_repeat", "0"], "--real_repeat must be >= 1"),
        (["--real_repeat", "10"], "--real_repeat needs --synth_root"),
        (["--synth_root", "SYNTH", "--synth_ratio", "0.5", "--real_repeat", "10"], "--real_repeat is for concat"),
        (["--match_real_exposure"], "--match_real_exposure needs --synth_root"),
    ],
)
def test_bad_repeat_and_exposure_arguments_are_refused(real_and_synthetic, tmp_path, capsys, flags, message):
    from crfm.segmentation.downstream import main

    real, synthetic = real_and_synthetic
    flags = [str(synthetic) if flag == "SYNTH" else flag for flag in flags]
    status = main(["--data_root", str(real), "--work_dir", str(tmp_path / "work"), *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "work").exists()


def test_loveda_config_builds(real_and_synthetic, tmp_path):
    """The packaged SegFormer-B2 LoveDA config: mmseg builds it on a CPU, and the script's overrides apply to it."""
    import numpy as np
    import torch
    from mmengine.config import Config
    from mmseg.apis import init_model
    from mmseg.registry import DATASETS

    cfg = Config.fromfile(str(LOVEDA_CONFIG))
    backbone = cfg.model.backbone
    assert (backbone.embed_dims, backbone.num_layers, backbone.num_heads) == (64, [3, 4, 6, 3], [1, 2, 5, 8])
    assert cfg.model.decode_head.num_classes == 7 and cfg.model.decode_head.norm_cfg.type == "BN"
    assert backbone.init_cfg is None and cfg.train_cfg.max_iters == 40000
    model = init_model(cfg, device="cpu")
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 64, 64), mode="tensor")
    assert logits.shape == (1, 7, 16, 16)
    # Merged by the script onto our toy index (6 classes): one sample through LoveDA's crop pipeline.
    real, synthetic = real_and_synthetic
    merged = _config(real, synthetic, tmp_path, "--mmseg_config", LOVEDA_CONFIG, "--max_iters", 10, "--real_repeat", 2)
    assert merged.model.decode_head.num_classes == 6 and merged.param_scheduler[-1]["end"] == 10
    sample = DATASETS.build(merged.train_dataloader.dataset)[0]
    assert sample["inputs"].shape[0] == 3 and max(sample["inputs"].shape[1:]) <= 512
    # --img_size scales the crop with the resize: a 512 px crop of ~64 px images gave batches of unequal sizes.
    small = _config(real, synthetic, tmp_path, "--mmseg_config", LOVEDA_CONFIG, "--img_size", 32)
    dataset = DATASETS.build(small.train_dataloader.dataset.datasets[0])
    np.random.seed(0)  # RandomResize draws its scale from numpy's global state: 16 to 64 px
    assert max(max(dataset[i % len(dataset)]["inputs"].shape[1:]) for i in range(12)) <= 32


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


def test_synth_ratio_one_draws_only_synthetic_samples(real_and_synthetic, tmp_path):
    """--synth_ratio 1 (train on synthetic, test on real): the sampler never draws a real item."""
    import itertools

    from mmengine.registry import init_default_scope
    from mmseg.registry import DATA_SAMPLERS, DATASETS

    from crfm.segmentation.downstream import build_config, parse_args

    real, synthetic = real_and_synthetic
    args = parse_args(["--data_root", str(real), "--work_dir", str(tmp_path / "w"), "--synth_root", str(synthetic),
                       "--synth_ratio", "1"])  # fmt: skip
    cfg = build_config(args)
    init_default_scope("mmseg")
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    sampler = DATA_SAMPLERS.build({**cfg.train_dataloader.sampler, "dataset": dataset, "seed": 0})
    real_size = len(dataset.datasets[0])
    drawn = list(itertools.islice(iter(sampler), 200))
    assert min(drawn) >= real_size and len(set(drawn)) == len(dataset.datasets[1])


def test_cached_loading_gives_the_plain_pipelines_samples_and_decodes_each_file_once(
    real_and_synthetic, tmp_path, monkeypatch
):
    """The toy configs load and resize through `CachedCompose`: the same samples, flips included, as the plain steps;
    each PNG decoded once however often it is drawn; a draw changed in place leaves the next draw as it was."""
    import copy

    import mmcv
    import numpy as np
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    real, synthetic = real_and_synthetic
    cfg = _config(real, synthetic, tmp_path, "--img_size", 32)
    cached_cfg = cfg.train_dataloader.dataset.datasets[0]
    first = cached_cfg.pipeline[0]
    assert first.type == "CachedCompose" and [t.type for t in first.transforms][-1] == "Resize"
    assert first.transforms[-1].scale == (32, 32)  # --img_size reaches a resize inside the wrapper
    plain_cfg = copy.deepcopy(cached_cfg)
    plain_cfg.pipeline = [*first.transforms, *cached_cfg.pipeline[1:]]
    init_default_scope("mmseg")
    decodes = []
    decode = mmcv.imfrombytes
    monkeypatch.setattr(mmcv, "imfrombytes", lambda *a, **k: decodes.append(1) or decode(*a, **k))

    def two_passes(dataset_cfg) -> list[dict]:
        dataset = DATASETS.build(dataset_cfg)
        np.random.seed(0)  # RandomFlip draws from numpy's global state
        return [dataset[i % len(dataset)] for i in range(2 * len(dataset))]

    plain = two_passes(plain_cfg)
    plain_decodes, decodes[:] = len(decodes), []
    cached = two_passes(cached_cfg)
    assert plain_decodes == 2 * 2 * 6 and len(decodes) == 2 * 6  # image + label, per draw vs per file
    for a, b in zip(plain, cached, strict=True):
        assert a["inputs"].shape == (3, 32, 32) and a["inputs"].equal(b["inputs"])
        assert a["data_samples"].gt_sem_seg.data.equal(b["data_samples"].gt_sem_seg.data)
    assert any(not a["inputs"].equal(b["inputs"]) for a, b in zip(plain[:6], plain[6:], strict=True))  # flipped anew
    loading = DATASETS.build(cached_cfg).pipeline.transforms[0]
    sample = DATASETS.build(cached_cfg).get_data_info(0)
    once = loading(copy.deepcopy(sample))
    once["img"] += 1
    assert not np.array_equal(loading(copy.deepcopy(sample))["img"], once["img"])


def test_per_class_iou_metric_reports_each_class_beside_mmseg_means():
    """`PerClassIoUMetric`: mmseg's aAcc / mIoU / mAcc unchanged, plus IoU.<class> = intersection / union (%), NaN for
    a class neither labelled nor predicted (which mmseg's mean leaves out)."""
    import math

    import torch
    from mmseg.evaluation import IoUMetric

    from crfm.segmentation.mmseg_ext import PerClassIoUMetric

    # Two images' (intersection, union, predicted, labelled) pixel counts for classes a, b, c.
    results = [
        tuple(torch.tensor(v, dtype=torch.float64) for v in ([3, 1, 0], [4, 4, 0], [3, 3, 0], [4, 2, 0])),
        tuple(torch.tensor(v, dtype=torch.float64) for v in ([1, 0, 0], [2, 2, 0], [1, 1, 0], [2, 1, 0])),
    ]
    metric, plain = PerClassIoUMetric(), IoUMetric()
    metric.dataset_meta = plain.dataset_meta = {"classes": ["a", "b", "c"]}
    got, expected = metric.compute_metrics(results), plain.compute_metrics(results)
    assert {k: got[k] for k in expected} == expected
    assert got["IoU.a"] == round(100 * 4 / 6, 2) and got["IoU.b"] == round(100 * 1 / 6, 2) and math.isnan(got["IoU.c"])
    assert got["mIoU"] == round((100 * 4 / 6 + 100 * 1 / 6) / 2, 2)


SHIPPED_CONFIGS = sorted((REPO / "crfm" / "segmentation" / "configs").glob("*.py"))


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda path: path.stem)
@pytest.mark.parametrize("iters", [10, 20, 40, 1000])
def test_every_run_reaches_the_peak_learning_rate(real_and_synthetic, tmp_path, config, iters):
    """The config's schedule stretched to --max_iters, built and stepped as mmengine's ParamSchedulerHook steps it:
    the learning rate reaches the optimizer's (LoveDA's warm-up scaled to 20 iterations used to stay at 6e-11)."""
    import torch
    from mmengine.registry import PARAM_SCHEDULERS

    real, _ = real_and_synthetic
    from crfm.segmentation.downstream import build_config, parse_args

    cfg = build_config(parse_args(["--data_root", str(real), "--work_dir", str(tmp_path), "--mmseg_config",
                                   str(config), "--max_iters", str(iters)]))  # fmt: skip
    peak = cfg.optim_wrapper.optimizer.lr
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=peak)
    schedulers = [PARAM_SCHEDULERS.build({**s, "optimizer": optimizer}) for s in cfg.param_scheduler]
    rates = []
    for _ in range(iters):
        rates.append(optimizer.param_groups[0]["lr"])
        for scheduler in schedulers:
            scheduler.step()
    assert max(rates) == pytest.approx(peak, rel=1e-4)
    assert rates[0] < peak and rates[-1] < peak  # still a warm-up and a decay


@pytest.mark.parametrize(("iters", "interval"), [(10, 1), (26, 1), (200, 10), (40000, 50)])
def test_progress_interval_workers_and_quiet_hooks(real_and_synthetic, tmp_path, iters, interval):
    """One progress line per 1/20 of the run (the config's 50 iterations at most); no more loader workers than
    cores; no visualization hook that draws nothing."""
    import os

    from crfm.segmentation.downstream import build_config, parse_args

    real, _ = real_and_synthetic
    cfg = build_config(parse_args(["--data_root", str(real), "--work_dir", str(tmp_path), "--mmseg_config",
                                   str(LOVEDA_CONFIG), "--max_iters", str(iters)]))  # fmt: skip
    assert cfg.default_hooks.logger.interval == interval and "visualization" not in cfg.default_hooks
    cores = len(os.sched_getaffinity(0))
    assert cfg.train_dataloader.num_workers == min(4, cores) and cfg.val_dataloader.num_workers == min(4, cores)


def test_a_work_dir_refuses_a_resume_with_other_data(real_and_synthetic, tmp_path):
    """The work dir records what its segmentor was trained on; a run there with another synthetic set, ratio or
    config is refused in one line naming each change, before anything is written."""
    real, synthetic = real_and_synthetic
    work = tmp_path / "row"
    common = ["--data_root", real, "--json_file", "train.jsonl", "--val_file", "val.jsonl", "--work_dir", work,
              "--no_progress", "--max_iters", 2, "--batch_size", 2, "--img_size", SIZE]  # fmt: skip
    first = _train(*common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((work / "downstream_settings.json").read_text())
    assert record["synth_root"] is None and record["batch_size"] == 2
    config = (work / "config.py").read_text()
    proc = _train(*common, "--synth_root", synthetic, "--synth_ratio", 0.5)
    message = _error(proc)
    assert message.startswith(f"error: {work}: holds a segmentor made with other settings (")
    assert f"synth_root: None -> '{synthetic.resolve()}'" in message and "synth_ratio: None -> 0.5" in message
    assert (work / "config.py").read_text() == config  # nothing rewritten
    assert "seed: None -> 5" in _error(_train(*common, "--seed", 5))
