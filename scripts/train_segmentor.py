"""Train an mmseg segmentor on an `index.jsonl` dataset with mmseg's own Runner (CPU by default).

    python scripts/train_segmentor.py --config configs/mmseg/toy_segformer.py --data_root DIR \
        --train_file index.jsonl --val_file val.jsonl --work_dir DIR --max_iters 1500 --batch_size 8 --num_cls 6

Writes into the work dir: mmengine's `iter_<N>.pth` (full training state, used to resume), `segmentor.pth`
(just `{"state_dict", "meta"}`: plain tensors and builtins, loadable with `torch.load(weights_only=True)` and
no allowlist; this is the file to give `crfm.segmentor.load_segmentor`), `config.py` (the merged config to
load it with) and `metrics.json`; prints the final validation mIoU.

Resuming: if the work dir holds a checkpoint from an earlier run (mmengine's `last_checkpoint` marker), the
run resumes from it. mmengine calls `torch.load` without `weights_only`, which torch >= 2.6 treats as True;
this script additionally forces weights-only loading for the whole process and supplies the small allowlist
of mmengine objects (`crfm.segmentor.MMENGINE_SAFE_GLOBALS`), so resuming never unpickles arbitrary code.
Resume with the same --max_iters: the learning-rate schedule's state comes back from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/mmseg/toy_segformer.py"))
    p.add_argument("--data_root", required=True, type=Path)
    p.add_argument("--train_file", default="index.jsonl", help="training index, relative to --data_root")
    p.add_argument("--val_file", default="val.jsonl", help="validation index, relative to --data_root")
    p.add_argument("--work_dir", required=True, type=Path)
    p.add_argument("--max_iters", type=int, help="default: the config's")
    p.add_argument("--batch_size", type=int, help="default: the config's")
    p.add_argument("--num_cls", type=int, help="number of classes (checked against classes.json if present)")
    p.add_argument("--img_size", type=int, help="square size images are resized to (default: the config's)")
    p.add_argument("--lr", type=float, help="optimizer learning rate (default: the config's)")
    p.add_argument("--seed", type=int, help="default: the config's")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu hides GPUs from mmengine")
    p.add_argument("--no_resume", action="store_true", help="start afresh even if the work dir has a checkpoint")
    args = p.parse_args(argv)
    for name in ("max_iters", "batch_size", "num_cls", "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1")
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


def build_config(args: argparse.Namespace):
    """The config file with the command-line overrides merged in."""
    from mmengine.config import Config

    from crfm.segmentor import CLASSES_FILE, read_classes_json

    cfg = Config.fromfile(args.config)
    data_root = str(args.data_root.resolve())
    num_cls = args.num_cls
    classes_json = (args.data_root / args.train_file).parent / CLASSES_FILE
    if classes_json.is_file():
        n = len(read_classes_json(classes_json)["classes"])
        if num_cls is not None and num_cls != n:
            raise SystemExit(f"--num_cls {num_cls} but {classes_json} lists {n} classes")
        num_cls = n
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
    cfg.resume = False
    return cfg


def _has_checkpoint(work_dir: Path) -> bool:
    marker = work_dir / "last_checkpoint"
    return marker.is_file() and Path(marker.read_text().strip()).is_file()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mmengine moves the model to CUDA whenever it sees a GPU

    import torch
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
    summary = {**meta["metrics"], "iters": int(runner.iter), "train_s": round(train_s, 1), "total_s": round(total_s, 1)}
    (work_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} and {work_dir / 'config.py'}")
    print(f"final mIoU: {metrics.get('mIoU', float('nan')):.2f} after {runner.iter} iters ({train_s:.0f} s training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
