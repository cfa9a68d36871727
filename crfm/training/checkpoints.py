"""accelerate checkpoints of a training run: atomic, only the trained weights, the last K kept, resumable.

`work_dir/checkpoints/checkpoint-<step>/` holds accelerate's state (optimizer, LR scheduler, RNG, sampler) and,
through the save/load pre-hooks registered here, the model's trained weights only (`save_trained`), not the
frozen base. A checkpoint is written under a temporary name and renamed when complete, so `latest` never
picks up a half-written one; a full disk while writing one ends the run in one line naming the folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from crfm.utils.fileio import writing

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint only gets its final name once fully written)."""
    folder = work_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_resume(work_dir: Path, resume: str | None) -> Path | None:
    """`--resume_from_checkpoint`: None, 'latest' (None when there is none yet) or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(work_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return path


def register_checkpoint_hooks(accelerator, meta: dict, target: str = "this model", ema=None) -> None:
    """Make accelerate's `save_state`/`load_state` store and restore only what is trained (diffusers-examples
    hooks). `meta` goes into each checkpoint's `crfm_checkpoint.json`; `target` describes the model in the error
    raised when a checkpoint does not fit it (e.g. another --train_mode). A checkpoint of another mask encoding or
    num_cls than the model's config records is refused before anything is loaded (`check_mask_inputs`). `ema` (an
    `EMAModel` of the trained weights) is saved and restored with them."""
    from crfm.models.conditioning import check_mask_inputs, recorded_mask_encoding
    from crfm.models.trained_weights import (
        load_ema_state,
        load_trained_weights,
        read_checkpoint_meta,
        save_trained,
        trained_state_dict,
    )

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for wrapped in models:
                save_trained(accelerator.unwrap_model(wrapped), output_dir, meta, ema=ema)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        # The model's config says what it is trained on; `meta` stands in for a model configured without it.
        config = accelerator.unwrap_model(models[0]).config if models else {}
        this_run = {key: config.get(key) or meta.get(key) for key in ("num_cls", "mask_encoding")}
        this_run["mask_encoding"] = recorded_mask_encoding(this_run)
        check_mask_inputs(read_checkpoint_meta(input_dir), input_dir, **this_run)
        # The EMA holds the trained parameters in their order; its file keys them by name.
        names = list(trained_state_dict(accelerator.unwrap_model(models[0]))) if ema is not None and models else []
        while models:
            load_trained_weights(accelerator.unwrap_model(models.pop()), input_dir, target=target)
        if ema is not None:
            load_ema_state(ema, input_dir, names)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_state(accelerator, work_dir: Path, resume: str | None) -> int:
    """Remove saves killed half-way, load the checkpoint `resume` names (if any); returns its global step."""
    if accelerator.is_main_process:
        for stale in (work_dir / "checkpoints").glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    path = resolve_resume(work_dir, resume)
    if path is None:
        if resume == "latest" and accelerator.is_main_process:
            print("[train] no checkpoint to resume from; starting fresh")
        return 0
    accelerator.load_state(str(path))
    step = int(path.name.removeprefix(CHECKPOINT_PREFIX))
    if accelerator.is_main_process:
        print(f"[train] resumed from {path} at step {step}")
    return step


def save_checkpoint(accelerator, work_dir: Path, step: int, keep: int) -> Path:
    """`save_state` into a temporary folder, then rename: a checkpoint is complete or absent. Keeps the last
    `keep` checkpoints (all if `keep` <= 0)."""
    folder = work_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        with writing(folder):  # a full disk is named in one line, whatever the library writing says
            accelerator.save_state(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stays usable
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(work_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
