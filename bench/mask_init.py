"""Which mask-branch initialisation trains faster: a copy of the image branch, or fresh weights?

    python bench/mask_init.py [--out outputs/bench_mask_init] [--base-steps 600] [--steps 1000]

1. toy data (64 train / 16 held-out scenes, 64 px) and the tiny SD3.5 pipeline, its VAE fitted to the toy
   images (`crfm.toy.pretrain.fit_vae`) so that decoded samples can be looked at; prompts vectorized;
2. the base MM-DiT is first fine-tuned on the toy images *without* masks (`train.py --no_mask`), so that, like
   SD3.5 for aerial imagery, it knows the domain before the mask branch is added;
3. from that base, `train.py` trains the mask model twice, `--mask_init copy` and `--mask_init fresh`, with the
   same seed, data order and noise;
4. held-out flow-matching loss with each scene's own mask, another scene's mask, and no mask
   (`crfm.training.objective.mask_following_losses`): own < other means the model follows the mask.
Writes loss curves and a held-out sample grid (PNG) and the numbers (JSON, Markdown) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from crfm.utils.runs import run_logged  # noqa: E402

RESOLUTION = 64  # set from --resolution


def train(out: Path, pipe: Path, data: Path, vectors: Path, work: Path, steps: int, *extra: str) -> None:
    if (work / "final" / "model.safetensors").is_file():
        print(f"reusing {work}")
        return
    cmd = [
        sys.executable, str(REPO / "train.py"), "--pretrained_model_name_or_path", str(pipe),
        "--data_root", str(data), "--train_file", "train_.jsonl", "--vectors_path", str(vectors),
        "--work_dir", str(work), "--num_cls", "6", "--resolution", str(RESOLUTION), "--train_batch_size", "4",
        "--max_train_steps", str(steps), "--checkpointing_steps", str(steps), "--learning_rate", "3e-4",
        "--report_to", "none", "--resume_from_checkpoint", "latest", "--seed", "0", *extra,
    ]  # fmt: skip
    run_logged(cmd, work.with_suffix(".log"), threads=None)


def export_base(tiny: Path, trained: Path, out: Path) -> Path:
    """A pipeline folder = the tiny pipeline with the text-only fine-tuned transformer."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    if (out / "transformer" / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for part in tiny.iterdir():
        if part.name != "transformer" and not (out / part.name).exists():
            (out / part.name).symlink_to(part.resolve())
    base = SD3Transformer2DModel.from_pretrained(tiny / "transformer")
    weights = load_file(trained / "final" / "model.safetensors")
    tuned = {k.removeprefix("transformer."): v for k, v in weights.items() if k.startswith("transformer.")}
    missing = set(tuned) - set(base.state_dict())
    assert not missing, missing
    base.load_state_dict(tuned, strict=False)
    base.save_pretrained(out / "transformer")
    return out


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.figure import Figure

    from crfm.utils.viz import ema

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    for name, records in curves.items():
        steps = [r["step"] for r in records]
        ax.plot(steps, ema([r["loss"] for r in records], 0.05), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (bias-corrected EMA, 0.05)")
    ax.set_title(f"mask-branch initialisation, tiny SD3.5 on toy data ({RESOLUTION} px)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def sample_grid(runs: dict[str, Path], base: Path, val, vectors: Path, path: Path, count: int = 6) -> None:
    """Held-out masks | sample of each run (same noise) | the real image."""
    from crfm.data.vectors import load_empty_prompt_vectors
    from crfm.sampling.pipeline import MaskToImagePipeline
    from crfm.sampling.sampler import to_uint8
    from crfm.toy.toydata import colourise
    from crfm.utils.viz import image_grid

    samples = [val[i] for i in range(count)]
    labels = torch.stack([s["label"] for s in samples])
    embeds = torch.stack([s["prompt_embeds"] for s in samples]).float()
    pooled = torch.stack([s["pooled_prompt_embeds"] for s in samples]).float()
    empty = load_empty_prompt_vectors(vectors)
    negative = {f"negative_{key}": empty[key][None] for key in ("prompt_embeds", "pooled_prompt_embeds")}
    columns = {"mask": [colourise(s["label"].numpy().astype("uint8")) for s in samples]}
    for init, work in runs.items():
        pipe = MaskToImagePipeline.from_checkpoint(work / "final", base, num_cls=6)
        out = pipe(labels, embeds, pooled, range(count), num_inference_steps=28, guidance_scale=2.0, **negative)
        columns[f"{init} init"] = to_uint8(out.images)
    columns["real"] = to_uint8(torch.stack([s["image"] for s in samples]))
    rows = [[columns[name][i] for name in columns] for i in range(count)]
    image_grid(rows, titles=list(columns), cell=128).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_mask_init")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    global RESOLUTION
    RESOLUTION = args.resolution
    out = args.out.resolve()

    from crfm.data.dataset import PairDataset
    from crfm.data.index import read_index
    from crfm.data.vectorize import vectorize_index
    from crfm.models.conditioning import recorded_mask_encoding
    from crfm.models.trained_weights import load_trained
    from crfm.toy.pretrain import fit_vae
    from crfm.toy.tiny import TinyConfig, save_tiny_pipeline
    from crfm.toy.toydata import write_dataset
    from crfm.training.objective import mask_following_losses
    from crfm.training.train import read_loss_log

    tiny, data, vectors = out / "tiny_sd35", out / "toydata", out / "vectors"
    if not (data / "index.jsonl").is_file():
        write_dataset(data, num=80, size=args.resolution, seed=0)
        lines = (data / "index.jsonl").read_text().splitlines(keepends=True)
        (data / "train.jsonl").write_text("".join(lines[:64]))
        (data / "val.jsonl").write_text("".join(lines[64:]))
    if not (tiny / "model_index.json").is_file():
        save_tiny_pipeline(tiny, TinyConfig())
        stats = fit_vae(tiny, data / "train.jsonl", steps=args.vae_steps, size=args.resolution, progress=False)
        print("fitted tiny VAE:", stats, flush=True)
    for split in ("train", "val"):
        vectorize_index(tiny, data / f"{split}.jsonl", data / f"{split}_.jsonl", vectors / split, progress=False)

    train(out, tiny, data, vectors / "train", out / "base", args.base_steps, "--no_mask")
    base = export_base(tiny, out / "base", out / "tiny_sd35_base")
    runs = {init: out / f"mask_{init}" for init in ("copy", "fresh")}
    for init, work in runs.items():
        train(out, base, data, vectors / "train", work, args.steps, "--mask_init", init)

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny / "vae").eval()
    val = PairDataset(
        read_index(data / "val_.jsonl"), data, resolution=args.resolution, num_cls=6, vectors_dir=vectors / "val"
    )
    results = {}
    for init, work in runs.items():
        model, meta = load_trained(work / "final", pretrained=base)
        val_losses = mask_following_losses(model, vae, val, 6, recorded_mask_encoding(meta))
        records = read_loss_log(work / "loss.jsonl")
        tail = [r["loss"] for r in records[-100:]]
        first = [r["loss"] for r in records[:100]]
        results[init] = {
            "train_loss_first_100": sum(first) / len(first),
            "train_loss_last_100": sum(tail) / len(tail),
            **{f"val_{k}": v for k, v in val_losses.items()},
        }
    plot({f"mask_init={k}": read_loss_log(w / "loss.jsonl") for k, w in runs.items()}, out / "mask_init_loss.png")
    sample_grid(runs, base, val, vectors / "val", out / "samples.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| mask_init | train loss, steps 1-100 | last 100 | held-out loss, own mask | other mask | no mask |",
        "|---|---|---|---|---|---|",
    ]
    for init, r in results.items():
        lines.append(
            f"| {init} | {r['train_loss_first_100']:.4f} | {r['train_loss_last_100']:.4f} | "
            f"{r['val_own_mask']:.4f} | {r['val_other_mask']:.4f} | {r['val_no_mask']:.4f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(f"\nbase: {args.base_steps} text-only steps; mask runs: {args.steps} steps, torch {torch.__version__}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
