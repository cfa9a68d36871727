"""Stage (c) of the paper: train an mmseg segmentor on real data, optionally plus synthesized data, and
evaluate it on a real validation split, with mmseg's own Runner.

    python -m crfm.segmentation.downstream --data_root REAL --json_file train.jsonl --val_file val.jsonl \
        --work_dir DIR [--mmseg_config CONFIG] [--max_iters 1500] [--batch_size 8] \
        [--synth_root SYNTH --synth_file index.jsonl [--synth_ratio 0.5 | --real_repeat 10]] \
        [--match_real_exposure]

(also `scripts/train_segmentor.py`, `crfm-train-segmentor`). `--mmseg_config` defaults to the small toy SegFormer
shipped with the package (`crfm/segmentation/configs/toy_segformer.py`); `--device` is the shared one (auto, cpu,
cuda, cuda:N or a GPU number), and a CPU device hides every GPU from mmengine.

Both datasets are in our layout (`index.jsonl` + `classes.json`; a synthesis work dir is one). Without
`--synth_ratio` the two are simply concatenated, so each sample is drawn as often as any other; `--real_repeat k`
lists the real set k times in that concatenation (TISynth's real x10 + synthetic), so each real image is drawn k
times as often as a synthetic one. With `--synth_ratio`, `MixedSourceSampler` draws a synthetic sample with
probability `synth_ratio` whatever the two sizes are, so the real:synthetic mix of the batches is set independently
of how many images were synthesized. Synthetic draws take the place of real ones: `--match_real_exposure` lengthens
the run so that each real image is drawn as often (in expectation) as in a real-only run of `--max_iters` iterations.

Writes into the work dir: mmengine's `iter_<N>.pth` (full training state, used to resume), `segmentor.pth`
(just `{"state_dict", "meta"}`: plain tensors and builtins, loadable with `torch.load(weights_only=True)` and
no allowlist; this is the file to give `crfm.segmentation.adapter.load_segmentor`), `config.py` (the merged config to
load it with) and `metrics.json` (validation mIoU/aAcc/mAcc, and `IoU.<class>` where the config evaluates with
`PerClassIoUMetric`; the data mix, iterations requested and run, the expected draws of each real and each synthetic
image, timings).

The work dir records the data and settings it was trained with (`downstream_settings.json`: the indexes and their
digests, synthetic root and file, ratio, repeat, exposure matching, config, batch, size, learning rate, seed; not
the iterations, so a finished run can be resumed to train longer); a later run there with others is refused in one
line naming each change, before anything is written (use another `--work_dir`, or `--no_resume` to start afresh).
The console shows one progress line (loss, learning rate, ETA) every 1/20 of the run, at most every 50 iterations;
mmengine's start-up dumps (environment, config, parameter groups) go to the run's log file only
(`<work_dir>/<timestamp>/`).

Resuming: if the work dir holds a checkpoint from an earlier run (mmengine's `last_checkpoint` marker), the
run resumes from it. mmengine calls `torch.load` without `weights_only`, which torch >= 2.6 treats as True;
this process additionally forces weights-only loading and supplies the small allowlist of mmengine objects
(`crfm.segmentation.safe_load.MMENGINE_SAFE_GLOBALS`), so resuming never unpickles arbitrary code. Resume with the same
--max_iters: the learning-rate schedule's state comes back from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crfm.data.dataset import check_indexes_pairs
from crfm.data.index import read_index
from crfm.utils.fileio import refuse_changed_settings, sha256_of_files, write_text_atomic
from crfm.utils.flags import UsageError, add_data_flags, add_run_flags, entry_point, resolve_device

if TYPE_CHECKING:
    from mmengine.config import Config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy_segformer.py"  # package data
SETTINGS_FILE = "downstream_settings.json"  # the work dir's record of what it was trained on
LOG_LINES = 20  # progress lines per run (at most one every config's logger interval)
# mmengine's start-up dumps, kept in the run's log file but not on the console: the environment, the whole config
# (config.py holds it), the hook order, one line per parameter group (hundreds for a SegFormer), and the notices
# mmengine's own hooks and metrics trigger (a FileClient, a backend alias, a metric without a prefix: nothing a
# user can change).
FILE_ONLY = re.compile(
    "|".join(
        (
            r"^\n-+\nSystem environment",
            r"^Config:\n",
            r"^Hooks will be executed",
            r"^paramwise_options -- ",
            r'^"FileClient" will be deprecated',
            r'^"HardDiskBackend" is the alias of "LocalBackend"',
            r"^The prefix is not set in metric class",
        )
    )
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crfm.segmentation.downstream", description=__doc__.split("\n\n")[0])
    segmentor = p.add_argument_group("segmentor (mmseg)")
    segmentor.add_argument(
        "--mmseg_config",
        "--config",
        dest="mmseg_config",
        default=str(DEFAULT_CONFIG),
        help="mmseg config to train (any model; default: the package's toy SegFormer)",
    )
    add_data_flags(p, "index.jsonl", "real training index", num_cls="optional", data_root_help="real dataset root")
    p.add_argument("--val_file", default="val.jsonl", help="real validation index, relative to --data_root")
    p.add_argument("--synth_root", type=Path, help="synthesized dataset root (e.g. a test.py work dir)")
    p.add_argument("--synth_file", default="index.jsonl", help="synthesized index, relative to --synth_root")
    p.add_argument(
        "--synth_ratio",
        type=float,
        help="probability that a training sample is synthetic (0 <= r <= 1; 1: synthetic only, the real set only "
        "names the classes: train on synthetic, test on real); default: proportional to sizes",
    )
    p.add_argument(
        "--real_repeat",
        type=int,
        default=1,
        metavar="N",
        help="list the real set N times in the concatenation with --synth_root (TISynth: 10); not with --synth_ratio",
    )
    p.add_argument(
        "--match_real_exposure",
        action="store_true",
        help="scale --max_iters so each real image is drawn as often as in a real-only run of --max_iters "
        "iterations (needs --synth_root)",
    )
    p.add_argument("--work_dir", required=True, type=Path, help="checkpoints, segmentor.pth, config.py, metrics.json")
    p.add_argument("--max_iters", type=int, help="default: the config's")
    p.add_argument("--batch_size", type=int, help="default: the config's")
    p.add_argument("--img_size", type=int, help="square size images are resized to (default: the config's)")
    p.add_argument("--lr", type=float, help="optimizer learning rate (default: the config's)")
    p.add_argument("--no_resume", action="store_true", help="start afresh even if the work dir has a checkpoint")
    add_run_flags(
        p,
        seed_help="seed of the segmentor's training (default: the config's)",
        seed_default=None,
        device=True,
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """The flag combinations argparse cannot check; UsageError names the flag."""
    for name in ("max_iters", "batch_size", "num_cls", "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.synth_ratio is not None:
        if args.synth_root is None:
            raise UsageError("--synth_ratio needs --synth_root")
        if not 0 <= args.synth_ratio <= 1:
            raise UsageError(f"--synth_ratio must be in [0, 1], got {args.synth_ratio}")
    if args.real_repeat < 1:
        raise UsageError(f"--real_repeat must be >= 1, got {args.real_repeat}")
    if args.real_repeat > 1 and args.synth_root is None:
        raise UsageError("--real_repeat needs --synth_root (it repeats the real set in the concatenation)")
    if args.real_repeat > 1 and args.synth_ratio is not None:
        raise UsageError("--real_repeat is for concatenation; with --synth_ratio the sampler sets the real share")
    if args.match_real_exposure and args.synth_root is None:
        raise UsageError("--match_real_exposure needs --synth_root (a real-only run is the reference)")
    if args.match_real_exposure and args.synth_ratio == 1:
        raise UsageError("--match_real_exposure with --synth_ratio 1: no real image is drawn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check `argv`; a bad combination is a usage error (argparse's message and exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except UsageError as exc:
        parser.error(str(exc))
    return args


def segmentor_device(device: str | int | None) -> torch.device:
    """`--device` for mmengine's Runner: cpu hides every GPU (mmengine uses CUDA whenever it sees one)."""
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif resolved.type != "cuda":
        raise UsageError(f"--device {device}: mmengine trains on cpu or cuda, not {resolved.type}")
    elif not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available (use --device cpu)")
    elif resolved.index is not None:
        torch.cuda.set_device(resolved.index)  # the Runner puts the model on the current CUDA device
    return resolved


def _scale_schedule(schedulers: list, old_iters: int, new_iters: int) -> list:
    """Stretch iteration-based param schedulers from `old_iters` to `new_iters` (warm-up keeps its share).

    mmengine's LinearLR reaches its end factor at step end - begin - 1, so a warm-up scaled to one iteration would
    stay at its start factor for the whole run (LoveDA's 1500 of 40k at 20 iterations: a peak of 6e-11): an inner
    boundary lands on iteration 2 or later, which every run of 3 or more iterations reaches."""

    def scale(step: int) -> int:
        if step <= 0:
            return 0
        if step >= old_iters:
            return new_iters
        return min(max(round(step * new_iters / old_iters), 2), new_iters - 1)

    out = []
    for sched in schedulers:
        sched = dict(sched)
        begin, end = scale(sched.get("begin", 0)), scale(sched.get("end", old_iters))
        sched["begin"], sched["end"] = min(begin, new_iters - 1), max(end, begin + 1)
        out.append(sched)
    return out


def _set_resize(pipeline: list, size: tuple[int, int]) -> None:
    """Every resize and crop of a pipeline, also those inside wrappers (`CachedCompose`, mmcv's `Compose`): a crop
    larger than the resized image would leave batches of unequal sizes (LoveDA's 512 px crop at --img_size 64)."""
    for step in pipeline:
        if step.get("type") in ("Resize", "RandomResize"):
            step["scale"] = size
        if step.get("type") == "RandomCrop":
            step["crop_size"] = size
        _set_resize(step.get("transforms", []), size)


def _class_count(index_file: Path) -> int | None:
    from crfm.data.index import CLASSES_FILE, read_classes_json

    classes_json = index_file.parent / CLASSES_FILE
    return len(read_classes_json(classes_json)["classes"]) if classes_json.is_file() else None


def check_sources(args: argparse.Namespace) -> int | None:
    """Both indexes exist and agree with `--num_cls` on the class count; the class count (None: the config's)."""
    num_cls = args.num_cls
    sources = [("--data_root", Path(args.data_root) / args.json_file)]
    if args.synth_root is not None:
        sources.append(("--synth_root", Path(args.synth_root) / args.synth_file))
    for flag, index_file in sources:
        if not index_file.is_file():
            raise UsageError(f"{flag}: no index at {index_file}")
        n = _class_count(index_file)
        if n is not None and num_cls is not None and n != num_cls:
            raise UsageError(f"{index_file.parent} lists {n} classes but the class count is {num_cls}")
        num_cls = n if n is not None else num_cls
    return num_cls


def draw_shares(real: int, synthetic: int, synth_ratio: float | None, real_repeat: int) -> tuple[float, float]:
    """Expected shares of the training draws that are real and synthetic: `synth_ratio` if given, else the sizes in
    the concatenation (`real_repeat` copies of the real set + the synthetic set, every item drawn equally often)."""
    if synthetic == 0:
        return 1.0, 0.0
    if synth_ratio is not None:
        return 1.0 - synth_ratio, synth_ratio
    return real_repeat * real / (real_repeat * real + synthetic), synthetic / (real_repeat * real + synthetic)


def exposure_matched_iters(real_only_iters: int, real_share: float) -> int:
    """Iterations at which a run whose draws are `real_share` real sees each real image as often as a real-only run
    of `real_only_iters` iterations (same batch size)."""
    return round(real_only_iters / real_share)


def _index_length(index_file: Path) -> int:
    return len(read_index(index_file, check_files=False))  # the datasets check the files when built


def build_config(args: argparse.Namespace) -> Config:
    """The config file with the command-line overrides (data, classes, schedule, size, mixing) merged in."""
    return _build_config(args)[0]


def _build_config(args: argparse.Namespace) -> tuple[Config, int]:
    """`build_config`, and the iterations asked for (--max_iters or the config's) before --match_real_exposure."""
    from mmengine.config import Config

    num_cls = check_sources(args)
    cfg = Config.fromfile(args.mmseg_config)
    data_root = str(Path(args.data_root).resolve())
    updates: dict = {"work_dir": str(Path(args.work_dir).resolve())}
    for loader, ann in (
        ("train_dataloader", args.json_file),
        ("val_dataloader", args.val_file),
        ("test_dataloader", args.val_file),
    ):
        updates[f"{loader}.dataset.data_root"] = data_root
        updates[f"{loader}.dataset.ann_file"] = ann
    if num_cls is not None:
        updates["model.decode_head.num_classes"] = num_cls
        if "auxiliary_head" in cfg.model and cfg.model.auxiliary_head is not None:
            updates["model.auxiliary_head.num_classes"] = num_cls
    if args.batch_size is not None:
        updates["train_dataloader.batch_size"] = args.batch_size
    if args.lr is not None:
        updates["optim_wrapper.optimizer.lr"] = args.lr
    if args.seed is not None:
        updates["randomness.seed"] = args.seed
    cfg.merge_from_dict(updates)

    old_iters = int(cfg.train_cfg.max_iters)
    requested = args.max_iters or old_iters
    max_iters = requested
    if args.match_real_exposure:
        real = _index_length(Path(args.data_root) / args.json_file)
        synthetic = _index_length(Path(args.synth_root) / args.synth_file)
        real_share, _ = draw_shares(real, synthetic, args.synth_ratio, args.real_repeat)
        max_iters = exposure_matched_iters(requested, real_share)
        print(
            f"--match_real_exposure: {max_iters} iterations instead of {requested} "
            f"({real_share:.1%} of the draws are real)"
        )
    cfg.train_cfg.max_iters = max_iters
    # No in-loop validation: the script validates once after training and reports that number.
    cfg.train_cfg.val_interval = max_iters
    cfg.train_cfg.val_begin = max_iters + 1
    cfg.param_scheduler = _scale_schedule(list(cfg.param_scheduler), old_iters, max_iters)
    ckpt = cfg.default_hooks.checkpoint
    ckpt.interval = min(int(ckpt.get("interval", max_iters)), max_iters)
    logger = cfg.default_hooks.get("logger")
    if logger is not None:  # a line with the loss and ETA every 1/LOG_LINES of the run, however short
        logger.interval = max(1, min(int(logger.get("interval", 50)), max_iters // LOG_LINES))
    if not cfg.default_hooks.get("visualization", {}).get("draw", False):
        cfg.default_hooks.pop("visualization", None)  # it draws nothing and only warns so at start-up
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        workers = min(int(cfg[loader].get("num_workers", 0)), cores)  # more than the cores only contend
        cfg[loader].num_workers = workers
        cfg[loader].persistent_workers = bool(workers and cfg[loader].get("persistent_workers", False))
    if args.img_size is not None:
        size = (args.img_size, args.img_size)
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            _set_resize(cfg[loader].dataset.pipeline, size)
        if cfg.model.data_preprocessor.get("size") is not None:
            cfg.model.data_preprocessor.size = size
    if args.synth_root is not None:
        _add_synthetic(cfg, Path(args.synth_root).resolve(), args.synth_file, args.synth_ratio, args.real_repeat)
    cfg.resume = False
    return cfg, requested


def _add_synthetic(cfg: Config, synth_root: Path, synth_file: str, ratio: float | None, real_repeat: int) -> None:
    """Train on ConcatDataset([real] * real_repeat + [synthetic]) (same pipeline), drawn with `MixedSourceSampler`
    for a ratio."""
    from crfm.segmentation.mmseg_ext import MMSEG_EXTENSIONS

    real = dict(cfg.train_dataloader.dataset)
    synth = {**real, "data_root": str(synth_root), "ann_file": synth_file}
    # mmengine's ConcatDataset takes BaseDatasets only, not a RepeatDataset: the real set is listed k times.
    cfg.train_dataloader.dataset = dict(type="ConcatDataset", datasets=[*[real] * real_repeat, synth])
    if ratio is not None:
        cfg.train_dataloader.sampler = dict(type="MixedSourceSampler", weights=[1.0 - ratio, ratio])
    imports = list(cfg.get("custom_imports", {}).get("imports", []))
    if MMSEG_EXTENSIONS not in imports:  # the dumped config.py must find MixedSourceSampler on its own
        cfg.custom_imports = dict(imports=[*imports, MMSEG_EXTENSIONS], allow_failed_imports=False)


def _has_checkpoint(work_dir: Path) -> bool:
    marker = work_dir / "last_checkpoint"
    return marker.is_file() and Path(marker.read_text().strip()).is_file()


def run_settings(args: argparse.Namespace, cfg: Config) -> dict[str, object]:
    """What a work dir's segmentor is trained on and how: a resume with anything else would mix two runs. The
    iterations are not among them: a finished run resumed with more continues its schedule."""
    real = Path(args.data_root) / args.json_file
    settings: dict[str, object] = {
        "index": str(real.resolve()),
        "index_digest": sha256_of_files([real]),
        "val_file": args.val_file,
        "synth_root": None,
        "synth_file": None,
        "synth_digest": None,
        "synth_ratio": args.synth_ratio,
        "real_repeat": args.real_repeat,
        "match_real_exposure": args.match_real_exposure,
        "config": str(Path(args.mmseg_config).resolve()),
        "config_digest": sha256_of_files([Path(args.mmseg_config)]),
        "batch_size": int(cfg.train_dataloader.batch_size),
        "img_size": args.img_size,
        "lr": args.lr,
        "seed": args.seed,
    }
    if args.synth_root is not None:
        synthetic = Path(args.synth_root) / args.synth_file
        settings.update(
            synth_root=str(Path(args.synth_root).resolve()),
            synth_file=args.synth_file,
            synth_digest=sha256_of_files([synthetic]),
        )
    return settings


def _keep_dumps_off_the_console(record: logging.LogRecord) -> bool:
    return not FILE_ONLY.match(record.getMessage())


def _runner_class():
    """mmengine's Runner whose console handler leaves out the start-up dumps (its log file keeps them)."""
    from mmengine.runner import Runner

    class QuietRunner(Runner):
        def build_logger(self, *args, **kwargs):
            logger = super().build_logger(*args, **kwargs)
            for handler in logger.handlers:
                if not isinstance(handler, logging.FileHandler):
                    handler.addFilter(_keep_dumps_off_the_console)
            return logger

    return QuietRunner


def train(args: argparse.Namespace) -> int:
    """Train, validate once, write segmentor.pth, config.py and metrics.json into --work_dir."""
    check_args(args)
    indexes = ((args.data_root, args.json_file), (args.data_root, args.val_file), (args.synth_root, args.synth_file))
    check_indexes_pairs(indexes, check_sources(args), progress=not args.no_progress)  # before mmengine: fails fast
    segmentor_device(args.device)

    from crfm.segmentation.safe_load import mmengine_safe_globals, weights_only_environment

    weights_only_environment()
    cfg, requested = _build_config(args)
    work_dir = Path(cfg.work_dir)
    settings = run_settings(args, cfg)
    if not args.no_resume:
        refuse_changed_settings(
            work_dir / SETTINGS_FILE,
            settings,
            "a segmentor",
            "use another --work_dir (one per row), or --no_resume to start afresh",
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(work_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    cfg.resume = not args.no_resume and _has_checkpoint(work_dir)
    if cfg.resume:
        print(f"resuming from {(work_dir / 'last_checkpoint').read_text().strip()}")
    cfg.dump(str(work_dir / "config.py"))
    amp = "Amp" in str(cfg.optim_wrapper.get("type", ""))  # mmengine's AmpOptimWrapper: autocast; else fp32
    print(
        f"training {cfg.train_cfg.max_iters} iterations, {'mixed precision (AMP)' if amp else 'fp32'}; start-up "
        f"log in {work_dir}/<timestamp>/"
    )

    start = time.perf_counter()
    runner = _runner_class().from_cfg(cfg)
    with mmengine_safe_globals():  # only in effect for mmengine's resume load
        runner.train()
    train_s = time.perf_counter() - start
    metrics = runner.val()
    total_s = time.perf_counter() - start

    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dataset_meta = dict(runner.train_dataloader.dataset.metainfo)
    meta = {
        "dataset_meta": {
            "classes": list(dataset_meta.get("classes", [])),
            "palette": [list(c) for c in dataset_meta.get("palette", [])],
        },
        "iter": int(runner.iter),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    out = work_dir / "segmentor.pth"
    tmp = out.with_name(".segmentor.pth.tmp")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, out)  # never leave a half-written checkpoint under the final name
    train_set = runner.train_dataloader.dataset
    parts = [len(d) for d in train_set.datasets] if hasattr(train_set, "datasets") else [len(train_set)]
    real, synthetic = parts[0], (parts[-1] if args.synth_root is not None else 0)  # [real] * k + [synthetic]
    real_share, synthetic_share = draw_shares(real, synthetic, args.synth_ratio, args.real_repeat)
    draws = int(runner.iter) * int(cfg.train_dataloader.batch_size) * runner.world_size
    summary = {
        **meta["metrics"],
        "iters": int(runner.iter),
        "max_iters_requested": requested,
        "real_train": real,
        "synthetic_train": synthetic,
        "synth_ratio": args.synth_ratio,
        "real_repeat": args.real_repeat,
        # expected draws of each image over the run: compare runs at equal real exposure
        "real_draws_per_image": round(draws * real_share / real, 4) if real else None,
        "synthetic_draws_per_image": round(draws * synthetic_share / synthetic, 4) if synthetic else None,
        "train_s": round(train_s, 1),
        "total_s": round(total_s, 1),
    }
    write_text_atomic(work_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} and {work_dir / 'config.py'}")
    mix = f", {real} real + {synthetic} synthetic" if synthetic else f", {real} real"
    miou = metrics.get("mIoU", float("nan"))
    print(f"final mIoU: {miou:.2f} after {runner.iter} iters ({train_s:.0f} s training{mix})")
    return 0


main = entry_point(build_parser, train)


if __name__ == "__main__":
    raise SystemExit(main())
