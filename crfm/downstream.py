"""Stage (c) of the paper: train an mmseg segmentor on real data, optionally plus synthesized data, and
evaluate it on a real validation split, with mmseg's own Runner.

    python scripts/train_segmentor.py --config configs/mmseg/toy_segformer.py --data_root REAL \
        --train_file train.jsonl --val_file val.jsonl --work_dir DIR [--max_iters 1500] [--batch_size 8] \
        [--synth_root SYNTH --synth_file index.jsonl --synth_ratio 0.5]

Both datasets are in our layout (`index.jsonl` + `classes.json`; a synthesis work dir is one). Without
`--synth_ratio` the two are simply concatenated, so each sample is drawn as often as any other; with it,
`MixedSourceSampler` draws a synthetic sample with probability `synth_ratio` whatever the two sizes are, so
the real:synthetic mix of the batches is set independently of how many images were synthesized.

Writes into the work dir: mmengine's `iter_<N>.pth` (full training state, used to resume), `segmentor.pth`
(just `{"state_dict", "meta"}`: plain tensors and builtins, loadable with `torch.load(weights_only=True)` and
no allowlist; this is the file to give `crfm.segmentor.load_segmentor`), `config.py` (the merged config to
load it with) and `metrics.json` (validation mIoU/aAcc/mAcc, the data mix and timings).

Resuming: if the work dir holds a checkpoint from an earlier run (mmengine's `last_checkpoint` marker), the
run resumes from it. mmengine calls `torch.load` without `weights_only`, which torch >= 2.6 treats as True;
this process additionally forces weights-only loading and supplies the small allowlist of mmengine objects
(`crfm.segmentor.MMENGINE_SAFE_GLOBALS`), so resuming never unpickles arbitrary code. Resume with the same
--max_iters: the learning-rate schedule's state comes back from the checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from mmseg.registry import DATA_SAMPLERS
from torch.utils.data import Sampler

from crfm.fileio import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "mmseg" / "toy_segformer.py"


@DATA_SAMPLERS.register_module()
class MixedSourceSampler(Sampler):
    """Infinite sampler over an mmengine `ConcatDataset` that picks sub-dataset `k` with probability
    `weights[k] / sum(weights)` for every sample, then takes that source's next index from its own reshuffled
    cycle (so within a source every sample is seen once per cycle). Ranks take interleaved slices of one
    seeded stream, as mmengine's `InfiniteSampler` does."""

    def __init__(self, dataset, weights: Sequence[float], seed: int | None = None) -> None:
        sizes = [len(d) for d in dataset.datasets]
        if len(weights) != len(sizes):
            raise ValueError(f"{len(weights)} weights for {len(sizes)} datasets")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        if any(size == 0 and w > 0 for size, w in zip(sizes, weights, strict=True)):
            raise ValueError(f"a dataset with weight > 0 is empty (sizes {sizes})")
        self.rank, self.world_size = get_dist_info()
        self.seed = sync_random_seed() if seed is None else seed
        self.sizes = sizes
        self.offsets = [0, *itertools.accumulate(sizes)][:-1]
        self.probabilities = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.size = len(dataset)

    def _stream(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        cycles = [iter(()) for _ in self.sizes]
        while True:
            for source in torch.multinomial(self.probabilities, 1024, replacement=True, generator=gen).tolist():
                index = next(cycles[source], None)
                if index is None:  # this source's cycle is used up: start a fresh permutation
                    cycles[source] = iter(torch.randperm(self.sizes[source], generator=gen).tolist())
                    index = next(cycles[source])
                yield self.offsets[source] + index

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._stream(), self.rank, None, self.world_size)

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Infinite stream: nothing depends on the epoch (mmengine calls this on every sampler)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="mmseg config (any model; ours is the default)")
    p.add_argument("--data_root", required=True, type=Path, help="real dataset root")
    p.add_argument("--train_file", default="index.jsonl", help="real training index, relative to --data_root")
    p.add_argument("--val_file", default="val.jsonl", help="real validation index, relative to --data_root")
    p.add_argument("--synth_root", type=Path, help="synthesized dataset root (e.g. a test.py work dir)")
    p.add_argument("--synth_file", default="index.jsonl", help="synthesized index, relative to --synth_root")
    p.add_argument(
        "--synth_ratio",
        type=float,
        help="probability that a training sample is synthetic (0 <= r < 1); default: proportional to sizes",
    )
    p.add_argument("--work_dir", required=True, type=Path)
    p.add_argument("--max_iters", type=int, help="default: the config's")
    p.add_argument("--batch_size", type=int, help="default: the config's")
    p.add_argument("--num_cls", type=int, help="number of classes (checked against classes.json if present)")
    p.add_argument("--img_size", type=int, help="square size images are resized to (default: the config's)")
    p.add_argument("--lr", type=float, help="optimizer learning rate (default: the config's)")
    p.add_argument("--seed", type=int, help="default: the config's")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu hides GPUs from mmengine")
    p.add_argument("--no_resume", action="store_true", help="start afresh even if the work dir has a checkpoint")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_iters", "batch_size", "num_cls", "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if args.synth_ratio is not None:
        if args.synth_root is None:
            parser.error("--synth_ratio needs --synth_root")
        if not 0 <= args.synth_ratio < 1:
            parser.error(f"--synth_ratio must be in [0, 1), got {args.synth_ratio}")
    return args


def _scale_schedule(schedulers: list, old_iters: int, new_iters: int) -> list:
    """Stretch iteration-based param schedulers from `old_iters` to `new_iters` (warm-up keeps its share)."""
    out = []
    for sched in schedulers:
        sched = dict(sched)
        begin = round(sched.get("begin", 0) * new_iters / old_iters)
        end = sched.get("end", old_iters)
        end = new_iters if end >= old_iters else round(end * new_iters / old_iters)
        sched["begin"], sched["end"] = min(begin, new_iters - 1), max(end, begin + 1)
        out.append(sched)
    return out


def _set_resize(pipeline: list, size: tuple[int, int]) -> None:
    for step in pipeline:
        if step.get("type") in ("Resize", "RandomResize"):
            step["scale"] = size


def _class_count(index_file: Path) -> int | None:
    from crfm.data import CLASSES_FILE, read_classes_json

    classes_json = index_file.parent / CLASSES_FILE
    return len(read_classes_json(classes_json)["classes"]) if classes_json.is_file() else None


def build_config(args: argparse.Namespace):
    """The config file with the command-line overrides (data, classes, schedule, size, mixing) merged in."""
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    num_cls = args.num_cls
    sources = [("--data_root", args.data_root / args.train_file)]
    if args.synth_root is not None:
        sources.append(("--synth_root", args.synth_root / args.synth_file))
    for flag, index_file in sources:
        if not index_file.is_file():
            raise SystemExit(f"error: {flag}: no index at {index_file}")
        n = _class_count(index_file)
        if n is not None and num_cls is not None and n != num_cls:
            raise SystemExit(f"error: {index_file.parent} lists {n} classes but the class count is {num_cls}")
        num_cls = n if n is not None else num_cls

    data_root = str(args.data_root.resolve())
    updates: dict = {"work_dir": str(args.work_dir.resolve())}
    for loader, ann in (
        ("train_dataloader", args.train_file),
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
    max_iters = args.max_iters or old_iters
    cfg.train_cfg.max_iters = max_iters
    # No in-loop validation: the script validates once after training and reports that number.
    cfg.train_cfg.val_interval = max_iters
    cfg.train_cfg.val_begin = max_iters + 1
    cfg.param_scheduler = _scale_schedule(list(cfg.param_scheduler), old_iters, max_iters)
    ckpt = cfg.default_hooks.checkpoint
    ckpt.interval = min(int(ckpt.get("interval", max_iters)), max_iters)
    if args.img_size is not None:
        size = (args.img_size, args.img_size)
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            _set_resize(cfg[loader].dataset.pipeline, size)
        if cfg.model.data_preprocessor.get("size") is not None:
            cfg.model.data_preprocessor.size = size
    if args.synth_root is not None:
        _add_synthetic(cfg, args.synth_root.resolve(), args.synth_file, args.synth_ratio)
    cfg.resume = False
    return cfg


def _add_synthetic(cfg, synth_root: Path, synth_file: str, ratio: float | None) -> None:
    """Train on ConcatDataset([real, synthetic]) (same pipeline), drawn with `MixedSourceSampler` for a ratio."""
    real = dict(cfg.train_dataloader.dataset)
    synth = {**real, "data_root": str(synth_root), "ann_file": synth_file}
    cfg.train_dataloader.dataset = dict(type="ConcatDataset", datasets=[real, synth])
    if ratio is not None:
        cfg.train_dataloader.sampler = dict(type="MixedSourceSampler", weights=[1.0 - ratio, ratio])
    imports = list(cfg.get("custom_imports", {}).get("imports", []))
    if "crfm.downstream" not in imports:  # the dumped config.py must find MixedSourceSampler on its own
        cfg.custom_imports = dict(imports=[*imports, "crfm.downstream"], allow_failed_imports=False)


def _has_checkpoint(work_dir: Path) -> bool:
    marker = work_dir / "last_checkpoint"
    return marker.is_file() and Path(marker.read_text().strip()).is_file()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mmengine moves the model to CUDA whenever it sees a GPU

    from mmengine.runner import Runner

    from crfm.segmentor import mmengine_safe_globals, weights_only_environment

    weights_only_environment()
    cfg = build_config(args)
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg.resume = not args.no_resume and _has_checkpoint(work_dir)
    if cfg.resume:
        print(f"resuming from {(work_dir / 'last_checkpoint').read_text().strip()}")
    cfg.dump(str(work_dir / "config.py"))

    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
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
    summary = {
        **meta["metrics"],
        "iters": int(runner.iter),
        "real_train": parts[0],
        "synthetic_train": sum(parts[1:]),
        "synth_ratio": args.synth_ratio,
        "train_s": round(train_s, 1),
        "total_s": round(total_s, 1),
    }
    write_text_atomic(work_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} and {work_dir / 'config.py'}")
    mix = f", {parts[0]} real + {sum(parts[1:])} synthetic" if len(parts) > 1 else f", {parts[0]} real"
    miou = metrics.get("mIoU", float("nan"))
    print(f"final mIoU: {miou:.2f} after {runner.iter} iters ({train_s:.0f} s training{mix})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
