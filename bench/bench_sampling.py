"""Sampling speed: our sampler vs StableDiffusion3Pipeline, CRFM's overhead, and 1 vs 2 processes.

    python bench/bench_sampling.py [--pipe DIR --ckpt DIR --data_root DIR --vectors DIR --segmentor DIR]
    python bench/bench_sampling.py --ratio_only --pipe crfm/toy/tiny_sd35_base   # part 1 alone, no demo needed

Without arguments it uses the embedded default that `bash demo.sh` leaves in outputs/demo (tiny SD3.5 with
fitted VAE, trained checkpoint, toy masks and vectors, toy segmentor). Prints a Markdown table.
1. our sampler with CRFM off and no mask vs `StableDiffusion3Pipeline.__call__`, same transformer, latents,
   embeddings, scheduler config, 23 steps, CFG 4.0: wall time and ratio, the median of `--repeats` rounds that
   time ours and theirs in turn (a shared CPU's load then falls on both alike); the same with the transformer
   replaced by a stub, which leaves each sampler's own loop (everything but the model);
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

import torch  # noqa: E402

from crfm.utils.runs import interleaved_medians, median_seconds  # noqa: E402

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


class Stub(torch.nn.Module):
    """Stands in for the transformer: returns half its input at once, so only the sampler's own loop is timed."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device and dtype for the pipeline to read

    @property
    def device(self) -> torch.device:  # read by the pipeline, as a diffusers model's
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs) -> tuple[torch.Tensor]:
        return (hidden_states * 0.5,)


def sampler_vs_pipeline(pipe, model, embeds, pooled, repeats: int) -> list[tuple[str, str]]:
    """Part 1: ours vs StableDiffusion3Pipeline on the same transformer, inputs and scheduler config; also with
    the transformer stubbed out."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from crfm.sampling.sampler import initial_noise, sample_latents

    batch, side = embeds.shape[0], 64 // pipe.vae_scale_factor
    noise = initial_noise(range(batch), 0, (model.transformer.config.in_channels, side, side))
    negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # reused, as the pipeline's

    def ours(transformer) -> torch.Tensor:
        return sample_latents(
            transformer, scheduler, noise.clone(), embeds, pooled, None, negative, negative_pooled,
            num_inference_steps=23, guidance_scale=4.0,
        ).latents  # fmt: skip

    def theirs(transformer) -> torch.Tensor:
        pipe.transformer = transformer
        return pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled, latents=noise.clone(), height=64, width=64,
            num_inference_steps=23, guidance_scale=4.0, output_type="latent",
        ).images  # fmt: skip

    same = torch.equal(ours(model), theirs(model.transformer))
    timed = interleaved_medians({"ours": lambda: ours(model), "theirs": lambda: theirs(model.transformer)}, repeats)
    stub = Stub(model.transformer.config)
    loops = interleaved_medians({"ours": lambda: ours(stub), "theirs": lambda: theirs(stub)}, repeats)
    return [
        (f"our sampler, CRFM off, no mask ({batch} images, 23 steps, CFG 4)", f"{timed['ours']:.3f} s"),
        ("StableDiffusion3Pipeline, same transformer/inputs", f"{timed['theirs']:.3f} s"),
        (f"ratio ours / pipeline (median of {repeats} interleaved rounds; latents identical: {same})",
         f"{timed['ours'] / timed['theirs']:.3f}"),
        ("the samplers' own loops (transformer stubbed out): ours / pipeline",
         f"{loops['ours'] * 1000:.1f} ms / {loops['theirs'] * 1000:.1f} ms"),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipe", type=Path, default=DEMO / "tiny_sd35")
    parser.add_argument("--ckpt", type=Path, default=DEMO / "train" / "final")
    parser.add_argument("--data_root", type=Path, default=DEMO / "toydata")
    parser.add_argument("--vectors", type=Path, default=DEMO / "vectors")
    parser.add_argument("--segmentor", type=Path, default=DEMO / "seg_real")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_sampling")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of part 1 (ours and theirs in turn)")
    parser.add_argument(
        "--ratio_only", action="store_true", help="part 1 only, on --pipe's transformer with random prompt vectors"
    )
    args = parser.parse_args()

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.models.mmdit import MaskSD3Transformer2DModel
    from crfm.models.trained_weights import load_trained
    from crfm.sampling.pipeline import MaskToImagePipeline
    from crfm.sampling.rectify import CRFMConfig
    from crfm.segmentation.adapter import load_segmentor

    pipe = StableDiffusion3Pipeline.from_pretrained(args.pipe)
    pipe.set_progress_bar_config(disable=True)
    if args.ratio_only:
        model = MaskSD3Transformer2DModel.from_sd3(args.pipe)  # the mask branch is not used here
        config, gen = model.transformer.config, torch.Generator().manual_seed(0)
        embeds = torch.randn(4, 77 + 256, config.joint_attention_dim, generator=gen)
        pooled = torch.randn(4, config.pooled_projection_dim, generator=gen)
        rows = sampler_vs_pipeline(pipe, model, embeds, pooled, args.repeats)
        print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
        print("| what | result |\n|---|---|\n" + "\n".join(f"| {what} | {result} |" for what, result in rows))
        return 0
    model, _ = load_trained(args.ckpt, pretrained=args.pipe)
    items = read_index(args.data_root / "index_.jsonl")[:4]
    data = PairDataset(items, args.data_root, resolution=64, num_cls=6, vectors_dir=args.vectors)
    samples = [data[i] for i in range(len(data))]
    embeds = torch.stack([s["prompt_embeds"] for s in samples]).float()
    pooled = torch.stack([s["pooled_prompt_embeds"] for s in samples]).float()
    rows = sampler_vs_pipeline(pipe, model, embeds, pooled, args.repeats)
    pipe.transformer = model.transformer

    def scheduler():
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

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
