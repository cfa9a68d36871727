"""Few-step evaluation of a trained model: judge mask fidelity, NFE, images/s and straightness, per sampler run.

    python -m crfm.evaluate_sampling --pretrained_model_name_or_path ... --lora_ckpt work_dirs/2rf/final \
        --data_root ... --json_file test_.jsonl --vectors_path ... --num_cls 6 --resolution 64 \
        --judge_config seg_judge/config.py --judge_ckpt seg_judge/segmentor.pth \
        --runs euler:20 euler:4:uniform heun:2:uniform rk45 --work_dir work_dirs/eval_2rf

Each run (`SOLVER[:STEPS[:GRID]]`, defaults --num_inference_steps and --sigma_grid) synthesizes one image per mask
of the index from the same noise, in memory, and a judge segmentor (one that never guided sampling) scores it
against the mask; `detail_ratio` compares the images' high-frequency energy with the real images' (blur shows
there, not in mask fidelity). With --mmseg_config/--mmseg_ckpt (the guide) every run uses CRFM. Straightness S_K (K in
--straightness_segments) is measured on a fine Euler path of the uniform grid (--straightness_steps). Writes
`results.json` and `fidelity_vs_nfe.png` to --work_dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from crfm.data.dataset import PairDataset
from crfm.data.index import read_index
from crfm.sampling.rectify import CRFMConfig, attach_guide, check_guide_flags
from crfm.sampling.sampler import SOLVERS, SolverConfig
from crfm.sampling.synthesis import add_guidance_flags, check_mask_guidance
from crfm.utils.base_folder import check_resolution
from crfm.utils.fileio import write_text_atomic
from crfm.utils.flags import (
    UsageError,
    add_data_flags,
    add_model_flags,
    add_run_flags,
    add_segmentor_flags,
    entry_point,
    positive_int,
    resolve_device,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfm.evaluate_sampling", description=__doc__.split("\n\n")[0])
    add_model_flags(parser, checkpoint=True, mask_encoding=True)
    add_data_flags(parser, "index_.jsonl", "masks' index written by preprocess/vectorize.py", vectors=True)
    add = parser.add_argument
    add("--judge_config", required=True, help="mmseg config of the judge (never the CRFM guide)")
    add("--judge_ckpt", required=True, help="judge weights (weights-only .pth or .safetensors)")
    add("--runs", nargs="+", default=["euler"], help="SOLVER[:STEPS[:GRID]] each, e.g. euler:4:uniform heun:2 rk45")
    add(
        "--num_inference_steps",
        type=positive_int,
        default=20,
        help="steps of a run that names none (rk45: CRFM's grid)",
    )
    add("--resolution", type=positive_int, default=512, help="output side, px")
    add_guidance_flags(parser)
    add("--batch_size", type=positive_int, default=16, help="images per sampler call")
    add("--limit", type=positive_int, default=None, help="only the first N masks")
    add(
        "--straightness_steps",
        type=positive_int,
        default=40,
        help="Euler steps of the path straightness is measured on",
    )
    add("--straightness_segments", type=positive_int, nargs="*", default=[1, 2, 4], help="K of the S_K reported")
    add("--work_dir", default="work_dirs/evaluate_sampling", help="results.json and the plot")
    add_run_flags(parser, seed_help="noise seed (the same noise for every run)", device=True)
    add_segmentor_flags(parser, required=False, purpose="of the CRFM guide (CRFM on in every run when given)")
    SolverConfig.add_flags(parser)
    CRFMConfig.add_flags(parser)
    return parser


def parse_run(text: str, args: argparse.Namespace) -> tuple[SolverConfig, int]:
    """'heun:4:uniform' -> (solver config, steps); missing parts from the command's defaults."""
    parts = text.split(":")
    if parts[0] not in SOLVERS or len(parts) > 3:
        raise UsageError(f"--runs {text!r}: expected SOLVER[:STEPS[:GRID]] with SOLVER in {SOLVERS}")
    steps = int(parts[1]) if len(parts) > 1 and parts[1] else args.num_inference_steps
    grid = parts[2] if len(parts) > 2 else args.sigma_grid
    config = SolverConfig(solver=parts[0], sigma_grid=grid, rtol=args.rtol, atol=args.atol)
    return config, steps


def load_masks(args: argparse.Namespace) -> list[dict]:
    data_root = Path(args.data_root)
    items = read_index(data_root / args.json_file, data_root)[: args.limit]
    data = PairDataset(items, data_root, args.resolution, num_cls=args.num_cls, vectors_dir=args.vectors_path)
    return [data[i] for i in range(len(data))]


def detail(images: torch.Tensor) -> float:
    """Mean high-frequency energy of images in [-1, 1]: the variance of the luminance's Laplacian. Mask fidelity does
    not see blur (a one-step mean image can be segmented well); this does."""
    grey = images.float().mean(dim=1, keepdim=True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return float(torch.nn.functional.conv2d(grey, kernel).flatten(1).var(dim=1).mean())


def sample_all(
    pipe, samples: list[dict], args, solver: SolverConfig, steps: int, crfm, negative: dict, observe=None
) -> tuple:
    """Images for every mask (noise id = position), in batches; returns (images, latents, NFE/image, seconds).
    `negative`: `negative_prompt_kwargs` (CFG)."""
    images, latents, evaluations = [], [], 0
    start = time.perf_counter()
    for begin in range(0, len(samples), args.batch_size):
        chunk = samples[begin : begin + args.batch_size]
        out = pipe(
            torch.stack([s["label"] for s in chunk]),
            torch.stack([s["prompt_embeds"] for s in chunk]),
            torch.stack([s["pooled_prompt_embeds"] for s in chunk]),
            noise_ids=[s["position"] for s in chunk],
            seed=args.seed,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            mask_guidance_scale=args.mask_guidance_scale,
            crfm=crfm,
            solver=solver,
            observe=observe,
            **negative,
        )
        images.append(out.images.cpu())
        latents.append(out.latents.float().cpu())
        evaluations += out.nfe * len(chunk)
    seconds = time.perf_counter() - start
    return torch.cat(images), torch.cat(latents), evaluations / len(samples), seconds


def evaluate_sampling(args: argparse.Namespace) -> dict:
    from crfm.fewstep.straightness import VelocityRecorder, straightness
    from crfm.sampling.pipeline import MaskToImagePipeline, negative_prompt_kwargs
    from crfm.segmentation.adapter import load_segmentor
    from crfm.segmentation.evaluate import mask_fidelity

    runs = [parse_run(text, args) for text in args.runs]  # bad runs are refused before any model loads
    check_guide_flags(args)
    check_mask_guidance(args)
    check_resolution(args.pretrained_model_name_or_path, args.resolution)
    samples = load_masks(args)
    device = resolve_device(args.device)
    pipe = MaskToImagePipeline.from_checkpoint(
        args.lora_ckpt, args.pretrained_model_name_or_path, num_cls=args.num_cls, device=device,
        mask_encoding=args.mask_encoding,
    )  # fmt: skip
    crfm = attach_guide(pipe, args, device)
    judge = load_segmentor(args.judge_config, args.judge_ckpt, device=device, num_cls=args.num_cls)
    negative = negative_prompt_kwargs(args.vectors_path, args.guidance_scale)
    sample_all(pipe, samples[:1], args, SolverConfig(), 1, None, negative)  # warm-up, so the first run's speed is fair
    real_detail = detail(torch.stack([s["image"] for s in samples]))
    results = []
    for solver, steps in runs:
        images, _, nfe, seconds = sample_all(pipe, samples, args, solver, steps, crfm, negative)
        scored = [{"image": image, "label": s["label"]} for image, s in zip(images, samples, strict=True)]
        fidelity = mask_fidelity(judge, scored, args.num_cls, progress=False)
        row = {
            "run": solver.describe(steps),
            "solver": solver.solver,
            "steps": steps,
            "sigma_grid": solver.sigma_grid,
            "nfe": nfe,
            "images_per_second": len(samples) / seconds,
            "mIoU": fidelity["mIoU"],
            "IoU": fidelity["IoU"],
            "detail_ratio": detail(images) / real_detail,
            "crfm": crfm is not None,
        }
        results.append(row)
        print(
            f"[evaluate_sampling] {row['run']}: judge mIoU {100 * row['mIoU']:.2f}, {nfe:.1f} NFE, "
            f"{row['images_per_second']:.2f} images/s, detail {row['detail_ratio']:.2f} x real",
            flush=True,
        )
    paths = []
    if args.straightness_segments:
        recorder = VelocityRecorder()
        path = SolverConfig(solver="euler", sigma_grid="uniform")
        _, final, _, _ = sample_all(pipe, samples, args, path, args.straightness_steps, crfm, negative, recorder)
        recorder = merge_batches(recorder, args.straightness_steps)
        paths = [straightness(recorder, final, k) for k in args.straightness_segments]
    for entry in paths:
        print(f"[evaluate_sampling] straightness S_{entry['segments']} = {entry['value']:.4f}")
    report = {
        "checkpoint": str(args.lora_ckpt),
        "masks": len(samples),
        "seed": args.seed,
        "mask_guidance_scale": args.mask_guidance_scale,
        "runs": results,
        "straightness": paths,
    }
    work_dir = Path(args.work_dir)
    write_text_atomic(work_dir / "results.json", json.dumps(report, indent=2) + "\n")
    from crfm.utils.viz import plot_fidelity_vs_nfe

    plot_fidelity_vs_nfe({Path(args.lora_ckpt).parent.name: results}, work_dir / "fidelity_vs_nfe.png")
    print(f"[evaluate_sampling] wrote {work_dir / 'results.json'}")
    return report


def merge_batches(recorder, steps: int):
    """The recorder saw batch after batch (`steps` evaluations each): one path over all items."""
    from crfm.fewstep.straightness import VelocityRecorder

    batches = len(recorder.sigmas) // steps
    merged = VelocityRecorder(sigmas=recorder.sigmas[:steps])
    for i in range(steps):
        merged.latents.append(torch.cat([recorder.latents[b * steps + i] for b in range(batches)]))
        merged.velocities.append(torch.cat([recorder.velocities[b * steps + i] for b in range(batches)]))
    return merged


main = entry_point(build_parser, evaluate_sampling)


if __name__ == "__main__":
    raise SystemExit(main())
