"""Rectified-flow fine-tuning of the mask-conditioned MM-DiT with accelerate (stage (a) of the paper).

The loop follows diffusers' SD3 training examples: x_t = (1 - σ) x + σ ε, target ε - x, timestep density and
loss weighting from `diffusers.training_utils`. Every random draw of a step (flip, posterior sample, noise,
timesteps, prompt dropout) comes from a generator seeded by (seed, rank, micro-step), and the data order
from accelerate's seedable sampler, so a run resumed from a checkpoint continues with the same losses as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crfm.data import DatasetError, PairDataset, read_index
from crfm.fileio import write_text_atomic

CHECKPOINT_PREFIX = "checkpoint-"
LOSS_LOG = "loss.jsonl"
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune SD3/SD3.5's MM-DiT with a mask branch (crfm).")
    add = parser.add_argument
    # Flags of the original scripts.
    add("--pretrained_model_name_or_path", required=True, help="local diffusers SD3/SD3.5 folder")
    add("--data_root", required=True, help="dataset folder (index paths are relative to it)")
    add("--train_file", default="index_.jsonl", help="index written by preprocess/vectorize.py")
    add("--vectors_path", required=True, help="folder of prompt vectors (vectorize's --work_dir)")
    add("--work_dir", default="work_dirs/crfm", help="checkpoints, logs, final weights")
    add("--num_cls", type=int, required=True, help="number of classes (mask ids 0..num_cls-1, 255 = ignore)")
    # Model and training mode.
    add("--train_mode", choices=["full", "lora"], default="full", help="full: image+mask branches; lora: LoRA+mask")
    add("--lora_rank", type=int, default=16, help="LoRA rank (--train_mode lora)")
    add("--mask_init", choices=["copy", "fresh"], default="copy", help="mask branch from the image branch or new")
    add("--no_mask", action="store_true", help="ablation: train on text only, the mask branch unused")
    add(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute block activations in the backward pass (less memory)",
    )
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="CUDA only; SDPA otherwise")
    # Optimisation.
    add(
        "--resolution",
        type=int,
        default=512,
        help="short side resize + centre crop, px (multiple of VAE factor x patch)",
    )
    add("--train_batch_size", type=int, default=1, help="per process")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (constant after warm-up by default)")
    add("--lr_scheduler", default="constant", help="diffusers.optimization.get_scheduler name")
    add("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps")
    add("--max_train_steps", type=int, default=1000, help="optimizer steps")
    add("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    add("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    add(
        "--weighting_scheme",
        choices=WEIGHTING_SCHEMES,
        default="logit_normal",
        help="SD3 timestep density / loss weighting",
    )
    add("--logit_mean", type=float, default=0.0, help="logit-normal mean (> 0 favours noisier timesteps)")
    add("--logit_std", type=float, default=1.0, help="logit-normal std")
    add("--mode_scale", type=float, default=1.29, help="scale of the 'mode' weighting scheme")
    add("--prompt_dropout", type=float, default=0.1, help="probability of the empty prompt (for CFG)")
    add("--flip_prob", type=float, default=0.5, help="random horizontal flip of image and mask together")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config")
    add("--seed", type=int, default=0, help="seed of every random draw (with rank and step)")
    # Checkpoints and logging.
    add("--checkpointing_steps", type=int, default=500, help="accelerate save_state every N steps")
    add("--checkpoints_total_limit", type=int, default=3, help="keep the last K checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    add("--report_to", default="tensorboard", help="accelerate tracker, or 'none'")
    add("--skip_data_check", action="store_true", help="skip the pre-flight check of every item")
    add("--no_progress", action="store_true", help="no progress bar (logs)")
    add("--record_batches", action="store_true", help="write each rank's item positions and weight digest")
    return parser


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """A generator for one micro-step: draws are a pure function of (seed, rank, step), hence resumable."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63))


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint only gets its final name once fully written)."""
    folder = work_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_resume(work_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(work_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return path


def check_items(dataset: PairDataset, progress: bool = True) -> None:
    """Open every item once before training, so bad data stops the run with its name, not silently later.

    Loading an item decodes image and mask (sizes, class ids) and reads its prompt vectors (a missing `index`
    field or vector file is named with a hint to run vectorize).
    """
    bar = tqdm(range(len(dataset)), desc="checking data", unit="item", leave=False, disable=not progress)
    for position in bar:
        dataset[position]


@torch.no_grad()
def mask_following_losses(
    model, vae, dataset: PairDataset, num_cls: int, sigmas: tuple[float, ...] = (0.3, 0.6, 0.9), seed: int = 0
) -> dict[str, float]:
    """Flow-matching loss on `dataset` with each item's own mask, with another item's mask, and with none.

    The gap between the first two measures how much the model follows the mask; noise and timesteps are
    fixed by `seed`, so numbers are comparable across models.
    """
    from crfm.model import encode_latents, encode_mask_latents

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    scheduler_timesteps = 1000.0
    totals = {"own_mask": 0.0, "other_mask": 0.0, "no_mask": 0.0}
    count = 0
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([s["image"] for s in samples]).to(device)
    labels = torch.stack([s["label"] for s in samples]).to(device)
    gen = torch.Generator().manual_seed(seed)
    latents = encode_latents(vae, images, generator=gen).to(dtype)
    masks = encode_mask_latents(vae, labels, num_cls).to(dtype)
    other = masks.roll(1, dims=0)  # each item gets its neighbour's mask
    embeds = torch.stack([s["prompt_embeds"] for s in samples]).to(device, dtype)
    pooled = torch.stack([s["pooled_prompt_embeds"] for s in samples]).to(device, dtype)
    for sigma in sigmas:
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        noisy = (1 - sigma) * latents + sigma * noise
        timestep = torch.full((len(samples),), sigma * scheduler_timesteps, device=device)
        target = (noise - latents).float()
        for key, condition in (("own_mask", masks), ("other_mask", other), ("no_mask", None)):
            pred = model(noisy, embeds, pooled, timestep, mask_hidden_states=condition, return_dict=False)[0]
            totals[key] += (pred.float() - target).pow(2).mean().item()
        count += 1
    return {key: value / count for key, value in totals.items()}


def read_loss_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(args: argparse.Namespace) -> dict:
    """Run training; returns a summary (steps, final loss, seconds per step, output folder)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from crfm.model import (
        MaskSD3Transformer2DModel,
        configure_training,
        encode_latents,
        encode_mask_latents,
        save_trained,
        trained_state_dict,
    )
    from crfm.text import load_empty_prompt_vectors

    work_dir = Path(args.work_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Without CUDA, ranks started by `accelerate launch --multi_gpu` run on the CPU with gloo.
        cpu=not torch.cuda.is_available(),
    )
    main = accelerator.is_main_process
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ----- data (validated before any model is loaded)
    data_root, vectors_dir = Path(args.data_root), Path(args.vectors_path)
    items = read_index(data_root / args.train_file, data_root)
    dataset = PairDataset(items, data_root, resolution=args.resolution, num_cls=args.num_cls, vectors_dir=vectors_dir)
    empty = load_empty_prompt_vectors(vectors_dir)
    if not args.skip_data_check:
        check_items(dataset, progress=main and not args.no_progress)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=len(dataset) >= args.train_batch_size * accelerator.num_processes,
    )

    # ----- models
    pretrained = args.pretrained_model_name_or_path
    # fp32: the SD3 VAE is unstable in half precision.
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", dtype=torch.float32).requires_grad_(False)
    vae.eval().to(accelerator.device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler")
    train_sigmas, train_timesteps = scheduler.sigmas.clone(), scheduler.timesteps.clone()
    model = MaskSD3Transformer2DModel.from_sd3(pretrained, mask_init=args.mask_init)
    counts = configure_training(model, args.train_mode, args.lora_rank)
    if args.no_mask:
        for branch in (model.mask_embed, model.mask_blocks):
            branch.requires_grad_(False)
        counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Frozen weights only need the compute dtype (halves the base's memory for LoRA); trained ones stay fp32.
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(weight_dtype)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers()
    if main:
        print(
            f"[train] mode {args.train_mode}: {counts['trainable'] / 1e6:.2f} M trainable / "
            f"{counts['total'] / 1e6:.2f} M parameters ({counts['frozen'] / 1e6:.2f} M frozen); "
            f"{len(dataset)} items, {accelerator.num_processes} process(es)"
        )
    meta = {
        "train_mode": args.train_mode,
        "lora_rank": args.lora_rank,
        "num_cls": args.num_cls,
        "base_model": str(Path(pretrained).resolve()),
        "resolution": args.resolution,
    }

    # accelerate's checkpoints hold only what is trained (diffusers-examples hooks), not the frozen base.
    def save_hook(models, weights, output_dir):
        if main:
            for wrapped in models:
                save_trained(accelerator.unwrap_model(wrapped), output_dir, meta)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        from crfm.model import CHECKPOINT_WEIGHTS

        while models:
            target = accelerator.unwrap_model(models.pop())
            weights = load_file(str(Path(input_dir) / CHECKPOINT_WEIGHTS))
            expected = set(trained_state_dict(target))
            if set(weights) != expected:
                raise ValueError(f"checkpoint {input_dir} does not match this model / --train_mode")
            target.load_state_dict(weights, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)

    # ----- resume
    updates_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    global_step = 0
    if main:
        for stale in (work_dir / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a save that was killed half-way
    resume = resolve_resume(work_dir, args.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(resume.name.removeprefix(CHECKPOINT_PREFIX))
        if main:
            print(f"[train] resumed from {resume} at step {global_step}")
    elif args.resume_from_checkpoint == "latest" and main:
        print("[train] no checkpoint to resume from; starting fresh")
    loss_log = work_dir / LOSS_LOG
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
        # Steps after the checkpoint were lost with the interrupted run; their log lines go too.
        kept = [r for r in read_loss_log(loss_log) if r["step"] <= global_step]
        write_text_atomic(loss_log, "".join(json.dumps(r) + "\n" for r in kept))
        accelerator.init_trackers("crfm", config={k: v for k, v in vars(args).items() if v is not None})

    # ----- loop
    # A run resumed at (or past) its step budget trains nothing more.
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch) if global_step < args.max_train_steps else 0
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    bar = tqdm(
        total=args.max_train_steps, initial=global_step, desc="train", unit="step", disable=not main or args.no_progress
    )
    empty_embeds = empty["prompt_embeds"].to(accelerator.device, weight_dtype)
    empty_pooled = empty["pooled_prompt_embeds"].to(accelerator.device, weight_dtype)
    start, start_step, last_loss = time.perf_counter(), global_step, float("nan")
    seen_positions: list[list[int]] = []
    model.train()
    for epoch in range(first_epoch, num_epochs):
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch else loader
        for batch_index, batch in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
            micro_step = epoch * len(loader) + batch_index
            gen = step_generator(args.seed, accelerator.process_index, micro_step)
            with accelerator.accumulate(model):
                image, label = batch["image"], batch["label"]
                seen_positions.append(batch["position"].tolist())
                flip = (torch.rand(image.shape[0], generator=gen) < args.flip_prob).to(image.device)
                image = torch.where(flip[:, None, None, None], image.flip(-1), image)
                label = torch.where(flip[:, None, None], label.flip(-1), label)
                with torch.no_grad():
                    latents = encode_latents(vae, image.float(), generator=gen).to(weight_dtype)
                    mask_latents = encode_mask_latents(vae, label, args.num_cls).to(weight_dtype)
                batch_size = latents.shape[0]
                noise = torch.randn(latents.shape, generator=gen).to(latents)
                u = compute_density_for_timestep_sampling(
                    args.weighting_scheme,
                    batch_size,
                    logit_mean=args.logit_mean,
                    logit_std=args.logit_std,
                    mode_scale=args.mode_scale,
                    generator=gen,
                )
                indices = (u * scheduler.config.num_train_timesteps).long().clamp_max(len(train_timesteps) - 1)
                timesteps = train_timesteps[indices].to(accelerator.device)
                sigmas = train_sigmas[indices].to(accelerator.device, latents.dtype).view(-1, 1, 1, 1)
                noisy = (1.0 - sigmas) * latents + sigmas * noise

                drop = (torch.rand(batch_size, generator=gen) < args.prompt_dropout).to(accelerator.device)
                embeds = batch["prompt_embeds"].to(accelerator.device, weight_dtype)
                pooled = batch["pooled_prompt_embeds"].to(accelerator.device, weight_dtype)
                embeds = torch.where(drop[:, None, None], empty_embeds.expand_as(embeds), embeds)
                pooled = torch.where(drop[:, None], empty_pooled.expand_as(pooled), pooled)

                condition = None if args.no_mask else mask_latents
                pred = model(noisy, embeds, pooled, timesteps, mask_hidden_states=condition, return_dict=False)[0]
                weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
                per_sample = (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).mean(dim=(1, 2, 3))
                loss = per_sample.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            last_loss = accelerator.gather(loss.detach()[None]).mean().item()
            lr = lr_scheduler.get_last_lr()[0]
            accelerator.log({"loss": last_loss, "lr": lr}, step=global_step)
            if main:
                with loss_log.open("a") as handle:
                    handle.write(json.dumps({"step": global_step, "loss": last_loss, "lr": lr}) + "\n")
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(accelerator, work_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                break
        skip_batches = 0
        if global_step >= args.max_train_steps:
            break
    bar.close()

    seconds_per_step = (time.perf_counter() - start) / max(1, global_step - start_step)
    if args.record_batches:
        record_rank(work_dir, accelerator.process_index, seen_positions, accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    final_dir = work_dir / "final"
    if main:
        save_trained(accelerator.unwrap_model(model), final_dir, meta)
        from crfm.viz import plot_loss_curve

        records = read_loss_log(loss_log)
        if records:
            plot_loss_curve(records, work_dir / "loss_curve.png", title=f"training loss ({args.train_mode})")
        summary = {
            "steps": global_step,
            "final_loss": last_loss,
            "seconds_per_step": seconds_per_step,
            "trainable_parameters": counts["trainable"],
            "final_weights": str(final_dir),
        }
        write_text_atomic(work_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"[train] done: {global_step} steps, {seconds_per_step:.3f} s/step, weights in {final_dir}")
    accelerator.end_training()
    return {"steps": global_step, "final_loss": last_loss, "seconds_per_step": seconds_per_step}


def record_rank(work_dir: Path, rank: int, positions: list[list[int]], model) -> None:
    """Diagnostics for multi-process runs: which items this rank trained on and a digest of its weights."""
    import hashlib

    from crfm.model import trained_state_dict

    digest = hashlib.sha256()
    for name, tensor in sorted(trained_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    record = {"rank": rank, "positions": positions, "weights_sha256": digest.hexdigest()}
    write_text_atomic(work_dir / "ranks" / f"rank{rank}.json", json.dumps(record) + "\n")


def save_checkpoint(accelerator, work_dir: Path, step: int, keep: int) -> Path:
    """`save_state` into a temporary folder, then rename: a checkpoint is complete or absent."""
    folder = work_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(work_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0
