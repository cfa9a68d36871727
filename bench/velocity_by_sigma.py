"""The generator's velocity along a fine Euler path, per σ: where a straightness spike comes from.

    python bench/velocity_by_sigma.py outputs/heldout_steps/steps1800/seed1 [more demo runs] [--steps 200]

Per finished demo run: its generator (`train/final`) samples the first `--masks` masks of `--json_file` (held-out
by default; `val_.jsonl` for choices) on a `--steps`-step Euler path of the uniform grid (the demo's mask guidance,
no CRFM, the run's seed), and the median over images of the mean squared velocity |v|² is printed at the `--at` σ
(the nearest grid point). A well-trained flow keeps |v|² near its neighbours'; one σ far above them is where the
path bends (bench/results_fewstep_s1800.md: a spike at σ = 0.025, a σ the fine-tuning's logit-normal density almost
never draws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

AT = (0.5, 0.1, 0.05, 0.04, 0.03, 0.025, 0.02, 0.015, 0.01, 0.005)


def median_speed_by_sigma(run: Path, steps: int, masks: int, index: str = "test_.jsonl") -> dict[float, float]:
    """σ of each evaluation -> median over the images of mean |v|² (the run's generator, the masks of `index`)."""
    import torch

    from crfm.fewstep import evaluate
    from crfm.fewstep.straightness import VelocityRecorder
    from crfm.sampling.pipeline import MaskToImagePipeline, negative_prompt_kwargs
    from crfm.sampling.sampler import SolverConfig

    recorded = json.loads((run / "demo_settings.json").read_text())
    args = evaluate.build_parser().parse_args([
        "--pretrained_model_name_or_path", str(run / "tiny_sd35"), "--data_root", str(run / "toydata"),
        "--vectors_path", str(run / "vectors"), "--num_cls", "6", "--resolution", str(recorded["resolution"]),
        "--mask_encoding", recorded["mask_encoding"], "--lora_ckpt", str(run / "train" / "final"),
        "--json_file", index, "--judge_config", "-", "--judge_ckpt", "-", "--runs", f"euler:{steps}:uniform",
        "--work_dir", "-", "--seed", str(recorded["seed"]), "--device", "cpu",
        "--mask_guidance_scale", str(recorded["mask_guidance_scale"]), "--no_progress",
    ])  # fmt: skip
    samples = evaluate.load_masks(args)[:masks]
    pipe = MaskToImagePipeline.from_checkpoint(
        args.lora_ckpt, args.pretrained_model_name_or_path, num_cls=args.num_cls, device=torch.device("cpu"),
        mask_encoding=args.mask_encoding,
    )  # fmt: skip
    negative = negative_prompt_kwargs(args.vectors_path, args.guidance_scale)
    recorder = VelocityRecorder()
    path = SolverConfig(solver="euler", sigma_grid="uniform")
    evaluate.sample_all(pipe, samples, args, path, steps, None, negative, recorder)
    recorder = evaluate.merge_batches(recorder, steps)
    return {
        float(sigma): float(velocity.pow(2).flatten(1).mean(dim=1).median())
        for sigma, velocity in zip(recorder.sigmas, recorder.velocities, strict=True)
    }


def nearest(speeds: dict[float, float], sigma: float) -> float:
    """The value at the grid point nearest `sigma`."""
    return speeds[min(speeds, key=lambda grid: abs(grid - sigma))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished demo runs")
    parser.add_argument("--steps", type=int, default=200, help="Euler steps of the uniform path")
    parser.add_argument("--masks", type=int, default=16, help="masks sampled (the first ones)")
    parser.add_argument("--json_file", default="test_.jsonl", help="the masks' index (val_.jsonl for choices)")
    parser.add_argument("--at", type=float, nargs="+", default=AT, help="σ printed")
    args = parser.parse_args()
    print("| run | " + " | ".join(f"σ {sigma:g}" for sigma in args.at) + " |")
    print("|---|" + "---|" * len(args.at))
    for run in args.runs:
        speeds = median_speed_by_sigma(run, args.steps, args.masks, args.json_file)
        print(f"| {run} | " + " | ".join(f"{nearest(speeds, sigma):.1f}" for sigma in args.at) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
