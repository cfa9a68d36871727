"""Sampling speed: our sampler vs StableDiffusion3Pipeline, CRFM's overhead, and 1 vs 2 processes.

    python bench/bench_sampling.py [--pipe DIR --ckpt DIR --data_root DIR --vectors DIR --segmentor DIR]

Without arguments it uses the embedded default that `bash demo.sh` leaves in outputs/demo (tiny SD3.5 with
fitted VAE, trained checkpoint, toy masks and vectors, toy segmentor). Prints a Markdown table.
1. our sampler with CRFM off and no mask vs `StableDiffusion3Pipeline.__call__`, same transformer, latents,
   embeddings, 23 steps, CFG 4.0: wall time and ratio (median of 3);
2. CRFM's cost per rectified step: masked sampling with `rectified_step` 0 vs 4 vs 8 (23 steps);
3. `test.py` throughput with 1 process vs 2 (`configs/accelerate_cpu_2proc.yaml`): images per second from the
   runs' own summaries (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from timing import median_seconds  # noqa: E402  (bench/timing.py)

DEMO = REPO / "outputs" / "demo"


def synth_throughput(args, processes: int, out: Path) -> float:
    cmd = [sys.executable, str(REPO / "test.py")]
    if processes > 1:
        config = REPO / "configs" / "accelerate_cpu_2proc.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(REPO / "test.py")]
    cmd += [
        "--pretrained_model_name_or_path", str(args.pipe), "--data_root", str(args.data_root),
        "--lora_ckpt", str(args.ckpt), "--vectors_path", str(args.vectors), "--num_cls", "6", "--resolution", "64",
        "--num_inference_steps", "23", "--batch_size", "4", "--work_dir", str(out), "--no_progress",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    images = len((out / "index.jsonl").read_text().splitlines())
    return images, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipe", type=Path, default=DEMO / "tiny_sd35")
    parser.add_argument("--ckpt", type=Path, default=DEMO / "train" / "final")
    parser.add_argument("--data_root", type=Path, default=DEMO / "toydata")
    parser.add_argument("--vectors", type=Path, default=DEMO / "vectors")
    parser.add_argument("--segmentor", type=Path, default=DEMO / "seg_real")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_sampling")
    args = parser.parse_args()

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.models.trained_weights import load_trained
    from crfm.sampling.pipeline import MaskToImagePipeline
    from crfm.sampling.rectify import CRFMConfig
    from crfm.sampling.sampler import initial_noise, sample_latents
    from crfm.segmentation.adapter import load_segmentor

    rows = []
    pipe = StableDiffusion3Pipeline.from_pretrained(args.pipe)
    pipe.set_progress_bar_config(disable=True)
    model, _ = load_trained(args.ckpt, pretrained=args.pipe)
    items = read_index(args.data_root / "index_.jsonl")[:4]
    data = PairDataset(items, args.data_root, resolution=64, num_cls=6, vectors_dir=args.vectors)
    samples = [data[i] for i in range(len(data))]
    embeds = torch.stack([s["prompt_embeds"] for s in samples]).float()
    pooled = torch.stack([s["pooled_prompt_embeds"] for s in samples]).float()
    negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    noise = initial_noise(range(4), 0, (16, 8, 8))

    def scheduler():
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def ours() -> None:
        sample_latents(
            model, scheduler(), noise.clone(), embeds, pooled, None, negative, negative_pooled,
            num_inference_steps=23, guidance_scale=4.0,
        )  # fmt: skip

    def theirs() -> None:
        with torch.no_grad():
            pipe.transformer = model.transformer
            pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled, latents=noise.clone(), height=64, width=64,
                num_inference_steps=23, guidance_scale=4.0, output_type="latent",
            )  # fmt: skip

    t_ours, t_theirs = median_seconds(ours, repeats=3), median_seconds(theirs, repeats=3)
    rows.append(("our sampler, CRFM off, no mask (4 images, 23 steps, CFG 4)", f"{t_ours:.2f} s"))
    rows.append(("StableDiffusion3Pipeline, same inputs", f"{t_theirs:.2f} s"))
    rows.append(("ratio ours / pipeline", f"{t_ours / t_theirs:.2f}"))

    labels = torch.stack([s["label"] for s in samples])
    segmentor = load_segmentor(args.segmentor / "config.py", args.segmentor / "segmentor.pth", num_cls=6)
    masked = MaskToImagePipeline(model, pipe.vae.requires_grad_(False), scheduler(), num_cls=6, segmentor=segmentor)
    timings = {}
    for rectified in (0, 4, 8):

        def crfm_run(rectified=rectified) -> None:
            masked(labels, embeds, pooled, range(4), num_inference_steps=23, crfm=CRFMConfig(rectified_step=rectified))

        timings[rectified] = median_seconds(crfm_run, repeats=3)
        rows.append(
            (f"masked sampling, rectified_step {rectified} (4 images, 23 steps)", f"{timings[rectified]:.2f} s")
        )
    per_step = (timings[8] - timings[0]) / 8 / 4
    rows.append(("CRFM overhead per rectified step per image", f"{per_step * 1000:.0f} ms"))
    plain_step = timings[0] / 23 / 4
    rows.append(("plain sampling step per image (for scale)", f"{plain_step * 1000:.0f} ms"))

    for processes in (1, 2):
        images, wall = synth_throughput(args, processes, args.out / f"procs{processes}")
        rows.append((f"test.py, {processes} process(es), {images} images, 64 px, 23 steps, wall incl. start-up",
                     f"{wall:.1f} s ({images / wall:.2f} img/s)"))  # fmt: skip

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| what | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
