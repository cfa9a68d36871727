"""What a training run is built from: the accelerator, the data, the models, the optimizer.

The order in which `train` calls these matters for reproducibility: `set_seed`, then data, then models (LoRA's
and a fresh mask branch's initialisation draw from the global RNG), then the optimizer. `check_run` refuses
flags that cannot work before any of it is built or anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from crfm.training.objective import FlowMatchingObjective, Objective, TrainTimesteps
from crfm.training.reflow import ReflowObjective
from crfm.utils.flags import UsageError

if TYPE_CHECKING:  # the model's module loads diffusers' transformers: imported where a model is built
    from crfm.models.mmdit import MaskSD3Transformer2DModel

# Every objective's flags are train.py's, in this order; `objective_for` picks the run's.
OBJECTIVES = (FlowMatchingObjective, ReflowObjective)

# --optimizer: torch's AdamW; bitsandbytes' 8-bit AdamW (CUDA only; 2 bytes of state per trained parameter
# instead of 8); transformers' Adafactor (factored second moment, no first moment: almost no state).
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def objective_for(args: argparse.Namespace) -> Objective:
    """The run's objective: the reflow family on --reflow_pairs, SD3's flow matching otherwise."""
    return (FlowMatchingObjective if args.reflow_pairs is None else ReflowObjective)(args)


def check_run(args: argparse.Namespace, objective: Objective) -> None:
    """Refuse, before anything is built or written, inputs the objective cannot use (e.g. a latent cache that does
    not fit the run), an optimizer this machine cannot run and a warm-up the schedule would ignore."""
    objective.check()
    if args.lr_scheduler == "constant" and args.lr_warmup_steps > 0:
        # diffusers' "constant" schedule takes no warm-up: the steps would be dropped without a word.
        raise UsageError("--lr_scheduler constant has no warm-up: use constant_with_warmup, or --lr_warmup_steps 0")
    if args.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise UsageError("--optimizer adamw8bit needs CUDA (bitsandbytes' 8-bit AdamW): use adamw or adafactor")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UsageError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from exc


def build_accelerator(args: argparse.Namespace, work_dir: Path):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "logs")),
        # The data order is a function of the seed and the epoch, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Without CUDA, ranks started by `accelerate launch --multi_gpu` run on the CPU with gloo.
        cpu=not torch.cuda.is_available(),
    )


def check_items(dataset: torch.utils.data.Dataset, progress: bool = True) -> None:
    """Open every item once before training, so bad data stops the run with its name, not silently later.

    Loading an item decodes image and mask (sizes, class ids) and reads its prompt vectors (a missing `index`
    field or vector file is named with a hint to run vectorize).
    """
    bar = tqdm(range(len(dataset)), desc="checking data", unit="item", leave=False, disable=not progress)
    for position in bar:
        dataset[position]


def build_data(
    args: argparse.Namespace, objective: Objective, num_processes: int, progress: bool
) -> tuple[torch.utils.data.Dataset, torch.utils.data.DataLoader, dict[str, torch.Tensor]]:
    """The objective's dataset (every item checked unless --skip_data_check), its loader and the empty prompt's
    vectors."""
    from crfm.data.vectors import load_empty_prompt_vectors

    dataset = objective.dataset()
    empty = load_empty_prompt_vectors(Path(args.vectors_path))
    if not args.skip_data_check:
        check_items(dataset, progress=progress)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=len(dataset) >= args.train_batch_size * num_processes,
    )
    return dataset, loader, empty


def build_model(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype):
    """The frozen fp32 VAE (with --latents_path only its config: no weights), the scheduler's training grid and
    the MM-DiT with its mask branch, configured for --train_mode; returns (model, vae, timesteps, parameter
    counts)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from crfm.data.latents import VAEConfig

    pretrained = args.pretrained_model_name_or_path
    if args.latents_path is not None:
        vae = VAEConfig(pretrained)
    else:
        # fp32: the SD3 VAE is unstable in half precision.
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", dtype=torch.float32).requires_grad_(False)
        vae.eval().to(device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler")
    model = mask_model(args, pretrained)
    counts = configure_model(model, args, weight_dtype)
    return model, vae, TrainTimesteps.from_scheduler(scheduler), counts


def mask_model(args: argparse.Namespace, base) -> MaskSD3Transformer2DModel:
    """The MM-DiT of `base` (a pipeline folder or an `SD3Transformer2DModel`) with the mask branch the flags ask
    for (--mask_init, --mask_encoding, --num_cls, --mask_add)."""
    from crfm.models.mmdit import MaskSD3Transformer2DModel

    return MaskSD3Transformer2DModel.from_sd3(
        base, mask_init=args.mask_init, mask_encoding=args.mask_encoding, num_cls=args.num_cls, mask_add=args.mask_add
    )


def configure_model(model: MaskSD3Transformer2DModel, args: argparse.Namespace, weight_dtype: torch.dtype) -> dict:
    """`model` set up for training as the flags say (train mode and LoRA rank, --init_ckpt, --no_mask, frozen
    weights in `weight_dtype`, gradient checkpointing, xformers); returns its parameter counts."""
    from crfm.models.trained_weights import configure_training

    counts = configure_training(model, args.train_mode, args.lora_rank)
    if args.init_ckpt is not None:
        init_from_checkpoint(model, args)
    if args.no_mask:
        for branch in model.mask_branch():
            branch.requires_grad_(False)
        counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cast_frozen(model, weight_dtype)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers()
    return counts


def cast_frozen(model: torch.nn.Module, weight_dtype: torch.dtype) -> None:
    """Frozen weights only need the compute dtype (halves the base's memory for LoRA); trained ones stay fp32."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(weight_dtype)


def init_from_checkpoint(model, args: argparse.Namespace) -> None:
    """--init_ckpt: the trained weights (their EMA if saved) of a checkpoint of the same inputs and train mode."""
    from crfm.models.conditioning import check_mask_inputs
    from crfm.models.trained_weights import load_trained_weights, read_checkpoint_meta

    meta = read_checkpoint_meta(args.init_ckpt)
    check_mask_inputs(meta, args.init_ckpt, **mask_inputs(model))
    if meta["train_mode"] != args.train_mode:
        raise UsageError(f"--init_ckpt {args.init_ckpt} was trained with --train_mode {meta['train_mode']}")
    if bool(meta.get("mask_add")) != args.mask_add:
        with_or_not = "with" if meta.get("mask_add") else "without"
        raise UsageError(f"--init_ckpt {args.init_ckpt} was trained {with_or_not} --mask_add: give the same")
    load_trained_weights(model, args.init_ckpt, target=f"--train_mode {args.train_mode}", use_ema=True)


def mask_inputs(model) -> dict:
    """What `model`'s mask branch is trained on, from its config (`check_mask_inputs`' keyword arguments)."""
    return {"num_cls": model.config.num_cls, "mask_encoding": model.config.mask_encoding}


def checkpoint_meta(args: argparse.Namespace) -> dict:
    """What, besides the trained weights, a checkpoint needs to rebuild the model (`crfm_checkpoint.json`)."""
    return {
        "train_mode": args.train_mode,
        "lora_rank": args.lora_rank,
        "num_cls": args.num_cls,
        "mask_encoding": args.mask_encoding,
        "base_model": str(Path(args.pretrained_model_name_or_path).resolve()),
        "resolution": args.resolution,
        "optimizer": args.optimizer,
        **({"ema_decay": args.ema_decay} if args.use_ema else {}),
        **objective_for(args).record(),
    }


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """--optimizer over `params` (`check_run` has refused what this machine cannot run). The --adam_* flags set
    AdamW and 8-bit AdamW; Adafactor takes the learning rate and weight decay, with a fixed step size (no
    relative step or parameter scaling, so --learning_rate and the LR schedule mean what they mean for AdamW)."""
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=args.learning_rate,
            weight_decay=args.adam_weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    adam = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    if args.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **adam)
    return torch.optim.AdamW(params, **adam)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, num_processes: int):
    """--optimizer over the trainable parameters and the LR schedule; returns (trainable, optimizer,
    lr_scheduler)."""
    from diffusers.optimization import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, trainable)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )
    return trainable, optimizer, lr_scheduler
