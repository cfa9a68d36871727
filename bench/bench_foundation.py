"""Timings of the foundation pieces on this machine's CPU; prints a Markdown table.

    python bench/bench_foundation.py [--prompts 256] [--threads N]

- vectorize throughput on the tiny pipeline (distinct prompts/s, end to end with file writes, and
  encode-only at several batch sizes);
- one training step (forward, backward, AdamW) of the tiny SD3.5 transformer at 64 and 128 px;
- toy-scene generation at 256 px.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from crfm.data.vectorize import encode_prompts, load_text_encoders, vectorize_index  # noqa: E402
from crfm.toy.tiny import TinyConfig, save_tiny_pipeline  # noqa: E402
from crfm.toy.toydata import CLASSES, generate_scene  # noqa: E402
from crfm.utils.runs import median_seconds  # noqa: E402


def distinct_prompts(n: int) -> list[str]:
    return [f"a satellite image of {CLASSES[i % 6]}, {CLASSES[(i // 6) % 6]}, tile {i}" for i in range(n)]


def bench_vectorize(pipe_dir: Path, work: Path, n: int) -> list[tuple[str, str]]:
    rows = []
    (work / "img").mkdir(parents=True)
    (work / "label").mkdir()
    Image.new("RGB", (8, 8)).save(work / "img" / "a.png")
    Image.new("L", (8, 8)).save(work / "label" / "a.png")
    prompts = distinct_prompts(n)
    lines = [json.dumps({"source": "label/a.png", "target": "img/a.png", "prompt": p}) for p in prompts]
    (work / "index.jsonl").write_text("\n".join(lines) + "\n")
    report = vectorize_index(pipe_dir, work / "index.jsonl", work / "out.jsonl", work / "vec", progress=False)
    rows.append(
        (
            f"vectorize, {n} distinct prompts, batch 16, fp32, incl. writes",
            f"{report.prompts_per_second:.0f} prompts/s",
        )
    )
    pipe = load_text_encoders(pipe_dir)
    for batch in (1, 16, 64):
        chunk = prompts[:batch]
        seconds = median_seconds(lambda chunk=chunk: encode_prompts(pipe, chunk), repeats=5, warmup=2)
        rows.append((f"encode_prompt only, batch {batch}", f"{batch / seconds:.0f} prompts/s"))
    return rows


def bench_train_step(pipe_dir: Path) -> list[tuple[str, str]]:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(pipe_dir / "transformer").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = model.config
    rows = [(f"tiny SD3.5 transformer parameters ({cfg.num_layers} layers)", f"{model.num_parameters() / 1e6:.2f} M")]
    for pixels, batch in ((64, 1), (64, 4), (128, 4)):
        side = pixels // 8
        latents = torch.randn(batch, cfg.in_channels, side, side)
        text = torch.randn(batch, 77 + 256, cfg.joint_attention_dim)
        pooled = torch.randn(batch, cfg.pooled_projection_dim)
        timestep = torch.rand(batch) * 1000

        def step(latents=latents, text=text, pooled=pooled, timestep=timestep) -> None:
            out = model(latents, text, pooled, timestep, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out, latents)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = median_seconds(step, repeats=10, warmup=2)
        rows.append((f"train step (fwd+bwd+AdamW), {pixels} px, batch {batch}, fp32", f"{seconds * 1000:.0f} ms"))
    return rows


def bench_toydata() -> list[tuple[str, str]]:
    seconds = median_seconds(lambda: generate_scene(0, 1, 256), repeats=20, warmup=2)
    return [("toy scene, 256 px", f"{seconds * 1000:.0f} ms")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        pipe_dir = save_tiny_pipeline(tmp / "tiny", TinyConfig())
        rows = [("build tiny SD3.5 pipeline (python -m crfm.toy.tiny)", f"{time.perf_counter() - start:.1f} s")]
        rows += bench_vectorize(pipe_dir, tmp / "vec_bench", args.prompts)
        rows += bench_train_step(pipe_dir)
        rows += bench_toydata()
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| what | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
