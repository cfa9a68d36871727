"""Rectified-flow fine-tuning of the mask-conditioned MM-DiT with accelerate (stage (a) of the paper).

The loop follows diffusers' SD3 training examples and holds no objective's branches: `crfm.training.build` picks
the run's objective (SD3's flow matching, `crfm.training.objective`, or on --reflow_pairs the reflow family,
`crfm.training.reflow`) and builds the other pieces of a run; `crfm.training.checkpoints` saves them. Every random
draw of a step comes from a generator seeded by (seed, rank, micro-step), and the data order from accelerate's
seedable sampler, so a run resumed from a checkpoint continues with the same losses as an uninterrupted one.

    python train.py --pretrained_model_name_or_path ... --data_root ... --vectors_path ... --num_cls N
    python -m crfm.training.train ...   (the same; `accelerate launch train.py ...` for several processes)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crfm.training.build import (
    OBJECTIVES,
    OPTIMIZERS,
    build_accelerator,
    build_data,
    build_model,
    build_optimizer,
    check_run,
    checkpoint_meta,
    objective_for,
)
from crfm.training.checkpoints import register_checkpoint_hooks, resume_state, save_checkpoint
from crfm.training.objective import LossFn, step_generator
from crfm.utils.base_folder import check_base_folder, check_resolution
from crfm.utils.constants import MASK_INITS, TRAIN_MODES
from crfm.utils.fileio import append_records, read_records, write_jsonl_atomic, write_text_atomic
from crfm.utils.flags import (
    DTYPES,
    add_data_flags,
    add_model_flags,
    add_pair_flags,
    add_run_flags,
    bounded,
    entry_point,
    non_negative,
    positive_float,
    positive_int,
    probability,
)

LOSS_LOG = "loss.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune SD3/SD3.5's MM-DiT with a mask branch (crfm).")
    add_model_flags(parser, mask_encoding=True)
    add_data_flags(parser, "index_.jsonl", "training index written by preprocess/vectorize.py", vectors=True)
    add = parser.add_argument
    add("--work_dir", default="work_dirs/crfm", help="checkpoints, logs, final weights")
    # Model and training mode.
    add("--train_mode", choices=TRAIN_MODES, default="full", help="full: image+mask branches; lora: LoRA+mask")
    add("--lora_rank", type=positive_int, default=16, help="LoRA rank (--train_mode lora)")
    add("--mask_init", choices=MASK_INITS, default="copy", help="mask branch from the image branch or new")
    add(
        "--mask_add", action="store_true",
        help="also add each mask token to the image token at its position (zero-initialised projection), beside the "
        "joint attention: the spatial correspondence given, not learned",
    )  # fmt: skip
    add("--no_mask", action="store_true", help="ablation: train on text only, the mask branch unused")
    add(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute block activations in the backward pass (less memory)",
    )
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="CUDA only; SDPA otherwise")
    add_pair_flags(parser)
    add(
        "--latents_path",
        default=None,
        help="cached VAE latents of the index (python -m crfm.training.cache_latents): no VAE is loaded",
    )
    # Optimisation.
    add("--train_batch_size", type=positive_int, default=1, help="per process")
    add("--gradient_accumulation_steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    add(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw (torch); adamw8bit (bitsandbytes, CUDA only: 2 B of state per trained parameter instead of 8); "
        "adafactor (transformers: factored second moment, no momentum)",
    )
    add("--learning_rate", type=non_negative, default=1e-4, help="peak learning rate (constant by default)")
    add("--lr_scheduler", default="constant", help="diffusers.optimization.get_scheduler name")
    add("--lr_warmup_steps", type=bounded(int, 0), default=0, help="linear warm-up steps (not with constant)")
    add("--max_train_steps", type=positive_int, default=1000, help="optimizer steps")
    add("--adam_beta1", type=probability, default=0.9, help="AdamW (and 8-bit AdamW) beta1")
    add("--adam_beta2", type=probability, default=0.999, help="AdamW (and 8-bit AdamW) beta2")
    add("--adam_weight_decay", type=non_negative, default=1e-4, help="weight decay (every --optimizer)")
    add("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW (and 8-bit AdamW) epsilon")
    add("--max_grad_norm", type=non_negative, default=1.0, help="gradient clipping norm")
    add("--use_ema", action="store_true", help="keep an EMA of the trained weights (checkpointed; sampling uses it)")
    add("--ema_decay", type=probability, default=0.999, help="EMA decay (diffusers EMAModel: warms up from 0)")
    # Checkpoints and logging.
    add("--checkpointing_steps", type=positive_int, default=500, help="accelerate save_state every N steps")
    add("--checkpoints_total_limit", type=int, default=3, help="keep the last K checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--dataloader_num_workers", type=bounded(int, 0), default=0, help="DataLoader worker processes")
    add("--report_to", default="tensorboard", help="accelerate tracker, or 'none'")
    add("--skip_data_check", action="store_true", help="skip the pre-flight check of every item")
    add("--record_batches", action="store_true", help="write each rank's item positions and weight digest")
    add_run_flags(parser, seed_help="seed of every random draw (with rank and step)", mixed_precision=True)
    for objective in OBJECTIVES:
        objective.add_flags(parser)
    return parser


def train(args: argparse.Namespace) -> dict:
    """Run training; returns a summary (steps, final loss, seconds per step)."""
    from accelerate.utils import set_seed

    # The base and the data are validated before anything is written or any model is loaded.
    check_base_folder(args.pretrained_model_name_or_path, ("transformer", "vae", "scheduler"))
    check_resolution(args.pretrained_model_name_or_path, args.resolution)
    objective = objective_for(args)
    check_run(args, objective)
    objective.prepare("cuda" if torch.cuda.is_available() else "cpu")
    work_dir = Path(args.work_dir)
    accelerator = build_accelerator(args, work_dir)
    main = accelerator.is_main_process
    set_seed(args.seed)
    # What accelerate settled on (flag or config); fp8 and others keep frozen weights in fp32.
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)

    dataset, loader, empty = build_data(
        args, objective, accelerator.num_processes, progress=main and not args.no_progress
    )
    model, vae, schedule, counts = build_model(args, accelerator.device, weight_dtype)
    if main:
        print(
            f"[train] mode {args.train_mode}: {counts['trainable'] / 1e6:.2f} M trainable / "
            f"{counts['total'] / 1e6:.2f} M parameters ({counts['frozen'] / 1e6:.2f} M frozen); "
            f"{len(dataset)} items, {accelerator.num_processes} process(es) on {accelerator.device}, mixed precision "
            f"{accelerator.mixed_precision}"
        )
    meta = checkpoint_meta(args)
    trainable, optimizer, lr_scheduler = build_optimizer(args, model, accelerator.num_processes)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=args.ema_decay)
        ema.to(accelerator.device)
    target = f"{meta['base_model']} in mode {args.train_mode}"
    register_checkpoint_hooks(accelerator, meta, target=target, ema=ema)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    global_step = resume_state(accelerator, work_dir, args.resume_from_checkpoint)
    loss_log = work_dir / LOSS_LOG
    if main:
        start_logs(accelerator, args, loss_log, global_step)

    empty = {key: value.to(accelerator.device, weight_dtype) for key, value in empty.items()}
    loss_of = objective.loss(model, vae, schedule, empty, weight_dtype)

    bar = tqdm(
        total=args.max_train_steps, initial=global_step, desc="train", unit="step", disable=not main or args.no_progress
    )
    start, start_step, last_loss = time.perf_counter(), global_step, float("nan")
    seen_positions: list[list[int]] = []
    model.train()
    for micro_step, batch in micro_batches(accelerator, loader, args, global_step):
        gen = step_generator(args.seed, accelerator.process_index, micro_step)
        seen_positions.append(batch["position"].tolist())
        loss = train_step(
            accelerator, model, loss_of, batch, gen, trainable, optimizer, lr_scheduler, args.max_grad_norm
        )
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.step(trainable)
        global_step += 1
        last_loss = log_step(accelerator, loss_log, bar, global_step, loss, lr_scheduler.get_last_lr()[0])
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, work_dir, global_step, args.checkpoints_total_limit)
        if global_step >= args.max_train_steps:
            break
    bar.close()

    if global_step > start_step:
        seconds_per_step = (time.perf_counter() - start) / (global_step - start_step)
    else:  # resumed at the budget: nothing trained in this run, so the run that trained speaks for it
        records = read_loss_log(loss_log)
        last_loss = records[-1]["loss"] if records else last_loss
        earlier = work_dir / "summary.json"
        seconds_per_step = json.loads(earlier.read_text())["seconds_per_step"] if earlier.is_file() else float("nan")
    if args.record_batches:
        record_rank(work_dir, accelerator.process_index, seen_positions, accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    summary = {"steps": global_step, "final_loss": last_loss, "seconds_per_step": seconds_per_step}
    if main:
        write_outputs(args, work_dir, accelerator.unwrap_model(model), meta, summary, counts["trainable"], ema)
    accelerator.end_training()
    return summary


def train_step(
    accelerator, model, loss_of: LossFn, batch: dict, generator: torch.Generator, trainable: list, optimizer,
    lr_scheduler, max_grad_norm: float,
) -> torch.Tensor:  # fmt: skip
    """One micro-step of train.py (bench/gpu_check.py times this one): the objective's loss, backward, clipping on
    an optimizer step, the optimizer and LR steps (accelerate holds them back while it accumulates)."""
    with accelerator.accumulate(model):
        loss = loss_of(batch, generator)
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def micro_batches(accelerator, loader, args: argparse.Namespace, global_step: int) -> Iterator[tuple[int, dict]]:
    """(micro-step, batch) from optimizer step `global_step` on, epoch after epoch, until the step budget's
    epochs are done (the caller stops at the budget). A run resumed at its budget gets nothing."""
    if global_step >= args.max_train_steps:
        return
    updates_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / updates_per_epoch)):
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch else loader
        for batch_index, batch in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
            yield epoch * len(loader) + batch_index, batch


read_loss_log = read_records  # loss.jsonl's steps; a line cut by a kill or a full disk is dropped (bench/ reads it)


def start_logs(accelerator, args: argparse.Namespace, loss_log: Path, global_step: int) -> None:
    """Main process: truncate the loss log to the resumed step, start accelerate's trackers (tensorboard)."""
    loss_log.parent.mkdir(parents=True, exist_ok=True)
    # Steps after the checkpoint were lost with the interrupted run; their log lines go too.
    kept = [r for r in read_loss_log(loss_log) if r["step"] <= global_step]
    write_jsonl_atomic(loss_log, kept)
    accelerator.init_trackers("crfm", config={k: v for k, v in vars(args).items() if v is not None})


def log_step(accelerator, loss_log: Path, bar, step: int, loss: torch.Tensor, lr: float) -> float:
    """Log one optimizer step (loss averaged over processes) to the trackers, loss.jsonl and the bar."""
    value = accelerator.gather(loss.detach()[None]).mean().item()
    accelerator.log({"loss": value, "lr": lr}, step=step)
    if accelerator.is_main_process:
        append_records(loss_log, [{"step": step, "loss": value, "lr": lr}])
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
    bar.update(1)
    return value


def write_outputs(args, work_dir: Path, model, meta: dict, summary: dict, trainable: int, ema=None) -> None:
    """Main process, after training: final weights (+ their EMA), loss curve, summary.json."""
    from crfm.models.trained_weights import save_trained
    from crfm.utils.viz import plot_loss_curve

    final_dir = work_dir / "final"
    save_trained(model, final_dir, meta, ema=ema)
    records = read_loss_log(work_dir / LOSS_LOG)
    if records:
        plot_loss_curve(records, work_dir / "loss_curve.png", title=f"training loss ({args.train_mode})")
    summary = {**summary, "trainable_parameters": trainable, "final_weights": str(final_dir)}
    write_text_atomic(work_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"[train] done: {summary['steps']} steps, {summary['seconds_per_step']:.3f} s/step, weights in {final_dir}")


def record_rank(work_dir: Path, rank: int, positions: list[list[int]], model) -> None:
    """Diagnostics for multi-process runs: which items this rank trained on and a digest of its weights."""
    import hashlib

    from crfm.models.trained_weights import trained_state_dict

    digest = hashlib.sha256()
    for name, tensor in sorted(trained_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    record = {"rank": rank, "positions": positions, "weights_sha256": digest.hexdigest()}
    write_text_atomic(work_dir / "ranks" / f"rank{rank}.json", json.dumps(record) + "\n")


main = entry_point(build_parser, train)


if __name__ == "__main__":
    raise SystemExit(main())
