"""Dataset synthesis: label masks (+ prompts) -> new image-mask pairs, with CRFM when a segmentor is given.

The output folder is a dataset in crfm's layout: `img/`, `label/` (the conditioning masks at the output
resolution), `index.jsonl` (input lines with new paths, prompts kept) and, with `--debug`, `debug/` panels
(synthesized | colourised mask | real image). Work is split over `accelerate launch` processes (unit j goes to
process j mod P); every unit's files are written atomically before its index line, so a killed run resumes by
skipping finished units and never leaves a line without its files.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crfm.data import DatasetError, IndexItem, load_image, load_label, read_index, resize_center_crop
from crfm.fileio import atomic_path, write_jsonl_atomic

SHARD_PATTERN = "index.rank{rank}.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Synthesize image-mask pairs with the trained MM-DiT (+ CRFM).")
    add = parser.add_argument
    add("--pretrained_model_name_or_path", required=True, help="local diffusers SD3/SD3.5 folder (the base)")
    add("--data_root", required=True, help="folder of the masks' index")
    add("--json_file", default="index_.jsonl", help="index written by preprocess/vectorize.py")
    add("--lora_ckpt", required=True, help="trained checkpoint folder (train.py's final/ or checkpoint-N/)")
    add("--vectors_path", required=True, help="prompt vectors of this index (vectorize's --work_dir)")
    add("--work_dir", default="work_dirs/synth", help="output dataset folder")
    add("--num_cls", type=int, required=True, help="number of classes (checked against the checkpoint)")
    add("--num_inference_steps", type=int, default=28, help="Euler steps (the paper: 23)")
    add("--guidance_scale", type=float, default=1.0, help="classifier-free guidance (1.0: off)")
    add("--resolution", type=int, default=512, help="output side, px (masks resized + centre-cropped)")
    add("--batch_size", type=int, default=1, help="images per sampler call")
    add("--num_per_mask", type=int, default=1, help="variants per mask (different seeds)")
    add("--seed", type=int, default=0, help="noise seed (drawn per item and variant, so independent of batching)")
    add("--debug", action="store_true", help="also write synthesized | mask | real panels")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="transformer/VAE dtype")
    # CRFM (on when a segmentor is given)
    add("--mmseg_config", default=None, help="segmentor config (CRFM on with --mmseg_ckpt)")
    add("--mmseg_ckpt", default=None, help="segmentor weights (weights-only .pth or .safetensors)")
    add("--rectified_step", type=int, default=4, help="CRFM corrects the first N sampling steps")
    add("--max_step_size", type=float, default=0.1, help="eta_max of the CRFM step-size scheme")
    add(
        "--step_scheme",
        choices=["LD", "LI", "C"],
        default="LD",
        help="eta schedule: linear decreasing, increasing, constant",
    )
    add("--num_rectified", type=int, default=1, help="CRFM passes per rectified step")
    add("--l2_norm", action="store_true", help="L2-normalise the CRFM gradient per image")
    add("--velocity_clamp", type=float, default=1.0, help="clamp rectified velocities to [-c, c] (paper: 1; 0: off)")
    add("--is_synth", action="store_true", help="also shrink the velocity by (1 - eta)")
    add("--crfm_chunk_size", type=int, default=1, help="images per CRFM backward pass (memory bound)")
    add("--checkpoint_decode", action="store_true", help="recompute the VAE decoder in CRFM's backward pass")
    add("--vae_tiling", action="store_true", help="tiled VAE decoding (large images)")
    add("--no_progress", action="store_true", help="no progress bar (logs)")
    return parser


def unit_name(position: int, item: IndexItem, variant: int) -> str:
    return f"{position:05d}_{Path(item.target).stem}_v{variant}"


def read_done(work_dir: Path) -> dict[str, dict]:
    """Finished units from every rank's shard: name -> output record (only those whose files exist)."""
    done: dict[str, dict] = {}
    for shard in sorted(work_dir.glob(SHARD_PATTERN.format(rank="*"))):
        for line in shard.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if (work_dir / record["target"]).is_file() and (work_dir / record["source"]).is_file():
                done[record["unit"]] = record
    return done


def _resize_label(label: np.ndarray, size: int) -> np.ndarray:
    """Short side to `size`, centre crop — the same geometry as `PairDataset` uses for images."""
    return np.asarray(resize_center_crop(Image.fromarray(label), size, Image.Resampling.NEAREST))


def synthesize(args: argparse.Namespace) -> dict:
    from accelerate import PartialState
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from tqdm.auto import tqdm

    from crfm.model import encode_mask_latents, load_trained, read_checkpoint_meta
    from crfm.rectify import ControlRectifier, CRFMConfig
    from crfm.sampling import decode_latents, initial_noise, sample_latents, to_uint8
    from crfm.text import load_empty_prompt_vectors, load_item_vectors

    state = PartialState(cpu=not torch.cuda.is_available())
    device, rank, world = state.device, state.process_index, state.num_processes
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    data_root, work_dir = Path(args.data_root), Path(args.work_dir)

    meta = read_checkpoint_meta(args.lora_ckpt)
    if meta.get("num_cls") not in (None, args.num_cls):
        raise DatasetError(
            f"checkpoint {args.lora_ckpt} was trained with num_cls={meta['num_cls']}, not --num_cls {args.num_cls}"
        )
    if (args.mmseg_config is None) != (args.mmseg_ckpt is None):
        raise DatasetError("CRFM needs both --mmseg_config and --mmseg_ckpt")
    items = read_index(data_root / args.json_file, data_root)
    units = [(pos, item, k) for pos, item in enumerate(items) for k in range(args.num_per_mask)]
    done = read_done(work_dir) if work_dir.is_dir() else {}
    mine = [u for j, u in enumerate(units) if j % world == rank and unit_name(u[0], u[1], u[2]) not in done]

    model, _ = load_trained(args.lora_ckpt, pretrained=args.pretrained_model_name_or_path, dtype=dtype, device=device)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", dtype=torch.float32)
    vae = vae.requires_grad_(False).eval().to(device)
    if args.vae_tiling:
        vae.enable_tiling()
    segmentor = None
    if args.mmseg_config is not None:
        from crfm.segmentor import load_segmentor

        segmentor = load_segmentor(args.mmseg_config, args.mmseg_ckpt, device=device, num_cls=args.num_cls)
    crfm_config = CRFMConfig(
        rectified_step=args.rectified_step,
        max_step_size=args.max_step_size,
        step_scheme=args.step_scheme,
        num_rectified=args.num_rectified,
        l2_norm=args.l2_norm,
        is_synth=args.is_synth,
        chunk_size=args.crfm_chunk_size,
        checkpoint_decode=args.checkpoint_decode,
        velocity_clamp=args.velocity_clamp,
    )
    empty = load_empty_prompt_vectors(args.vectors_path) if args.guidance_scale > 1.0 else None
    for sub in ("img", "label", *(("debug",) if args.debug else ())):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    shard = work_dir / SHARD_PATTERN.format(rank=rank)
    latent_side = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    # One scheduler for all batches: the sampler's set_timesteps resets its state each time.
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler"
    )

    failures: list[str] = []
    traces: list[dict] = []
    start, finished = time.perf_counter(), 0
    bar = tqdm(total=len(mine), desc=f"synthesize[{rank}]", unit="img", disable=args.no_progress or not mine)
    for begin in range(0, len(mine), args.batch_size):
        chunk, batch = mine[begin : begin + args.batch_size], []
        for pos, item, k in chunk:
            try:  # a bad item is reported and skipped; the rest of the batch goes on
                label = _resize_label(load_label(data_root / item.source, args.num_cls), args.resolution)
                vectors = load_item_vectors(args.vectors_path, item)
                batch.append((pos, item, k, label, vectors))
            except DatasetError as exc:
                failures.append(f"{item.where()}: {exc}")
                print(f"error: {item.where()}: {exc}", flush=True)
        bar.update(len(chunk) - len(batch))  # the failed ones
        if not batch:
            continue
        labels = torch.from_numpy(np.stack([b[3] for b in batch]).astype(np.int64)).to(device)
        embeds = torch.stack([b[4]["prompt_embeds"] for b in batch]).to(device, dtype)
        pooled = torch.stack([b[4]["pooled_prompt_embeds"] for b in batch]).to(device, dtype)
        with torch.no_grad():
            masks = encode_mask_latents(vae, labels, args.num_cls).to(dtype)
        noise_ids = [pos * args.num_per_mask + k for pos, _, k, _, _ in batch]
        noise = initial_noise(noise_ids, args.seed, (masks.shape[1], latent_side, latent_side)).to(device, dtype)
        hook = None
        if segmentor is not None:
            hook = ControlRectifier(crfm_config, segmentor, vae, labels, args.num_inference_steps)
        latents = sample_latents(
            model,
            scheduler,
            noise,
            embeds,
            pooled,
            masks,
            None if empty is None else empty["prompt_embeds"][None].to(device, dtype),
            None if empty is None else empty["pooled_prompt_embeds"][None].to(device, dtype),
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            velocity_hook=hook,
        )
        with torch.no_grad():
            images = to_uint8(decode_latents(vae, latents.float()))
        records = []
        for (pos, item, k, label, _), image in zip(batch, images, strict=True):
            name = unit_name(pos, item, k)
            with atomic_path(work_dir / "img" / f"{name}.png") as tmp:
                Image.fromarray(image).save(tmp)
            with atomic_path(work_dir / "label" / f"{name}.png") as tmp:
                Image.fromarray(label.astype(np.uint8)).save(tmp)
            if args.debug:
                write_panel(work_dir / "debug" / f"{name}.png", image, label, data_root / item.target, args)
            records.append(
                {
                    **{key: v for key, v in item.record.items() if key not in ("index",)},
                    "source": f"label/{name}.png",
                    "target": f"img/{name}.png",
                    "unit": name,
                    "source_mask": item.source,
                    "variant": k,
                    "seed": args.seed,
                    "crfm": segmentor is not None,
                }
            )
        with shard.open("a") as handle:  # after the files: an index line never lacks its files
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        if hook is not None:
            traces.extend({"units": [r["unit"] for r in records], **t} for t in hook.trace)
        finished += len(batch)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()

    summary = {
        "units": len(units),
        "done_before": len(done),
        "synthesized": finished,
        "failures": failures,
        "seconds_per_image": seconds / finished if finished else math.nan,
        "crfm": segmentor is not None,
    }
    if traces:
        trace_path = work_dir / f"crfm_trace.rank{rank}.jsonl"
        with trace_path.open("a") as handle:
            handle.write("".join(json.dumps(t) + "\n" for t in traces))
    if state.is_main_process:
        merged = read_done(work_dir)
        order = {unit_name(p, i, k): n for n, (p, i, k) in enumerate(units)}
        records = sorted((r for r in merged.values() if r["unit"] in order), key=lambda r: order[r["unit"]])
        write_jsonl_atomic(work_dir / "index.jsonl", records)
        classes = data_root / "classes.json"
        if classes.is_file():
            (work_dir / "classes.json").write_text(classes.read_text())
        print(
            f"[synthesize] {len(records)}/{len(units)} images in {work_dir} ({finished} now, {len(done)} before, "
            f"{len(failures)} failed on rank 0); {summary['seconds_per_image']:.2f} s/image; CRFM "
            f"{'on' if segmentor is not None else 'off'}"
        )
    return summary


def write_panel(path: Path, image: np.ndarray, label: np.ndarray, real_path: Path, args) -> None:
    """synthesized | colourised mask | real image (resized like the mask), side by side."""
    from crfm.viz import colourise_mask, image_grid

    palette = None
    classes_file = Path(args.data_root) / "classes.json"
    if classes_file.is_file():
        palette = [tuple(c) for c in json.loads(classes_file.read_text()).get("palette", [])] or None
    if palette is None:
        from crfm.toydata import PALETTE as palette
    try:
        real = np.asarray(resize_center_crop(load_image(real_path), args.resolution, Image.Resampling.BICUBIC))
    except DatasetError:
        real = np.full_like(image, 255)
    grid = image_grid([[image, colourise_mask(label, palette), real]], titles=["synthesized", "mask", "real"])
    with atomic_path(path) as tmp:
        grid.save(tmp)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = synthesize(args)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 1 if summary["failures"] else 0
