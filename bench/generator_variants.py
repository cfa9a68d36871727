"""Fine-tuning variants of the demo's generator, scored on the *validation* masks (for choices, never the held-out).

    python bench/generator_variants.py --runs outputs/bench_demo/default/seed0 outputs/bench_demo/default/seed1 \
        --variant mosaics="--generator_mosaics" --variant bf16="--mixed_precision bf16" --jobs 2

Each run is a finished demo; a variant is its recorded settings with the variant's knobs. Its base, labelled
scenes, prompt vectors, guide and judge are reused.
For each (variant, run) the demo's own generator stage runs with the variant's knobs (`Demo.generator`, the same
commands; the run's own generator is the `default` variant), then 2 images per validation mask, plain and CRFM
(test.py defaults, the run's guide), from the same noise, scored by the run's judge (it never guides). The table:
judge mIoU and IoU per class, mean ± std over runs, the paired difference to `default`, and seconds per fine-tuning
step (one thread). A variant with `--base FOLDER` fine-tunes from that base (its text encoders must be the run's,
as the run's prompt vectors are reused). Variants that would train the same generator share one fine-tuning
(`fine_tuning_key`): they differ only in sampling knobs (`SAMPLING_KNOBS`, e.g. `--mask_guidance_scale`) or in a base
whose VAE decoder alone differs (`--refit_vae_decoder_on`); the first of them trains it (the run's own when that is
`default`), the others wait and sample from it.
Resumable: finished fine-tunings and syntheses are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from functools import partial
from pathlib import Path

from PIL import Image

from crfm.data.index import read_index
from crfm.toy.pretrain import shares_latent_space
from crfm.toy.toydata import CLASSES
from crfm.utils.runs import REPO, Job, mean_std, print_table, run_jobs_or_exit, run_logged

# What a variant's folder takes from the run unchanged (links): data, base, vectors, guide, real mosaics.
SHARED = ("toydata", "tiny_sd35", "vectors", "seg_real", "layouts_real")
SYNTHESES = {"plain": None, "crfm": "default"}  # image set -> Demo.synthesis_job's CRFM setting
PER_MASK = 2
SAMPLING_KNOBS = ("mask_guidance_scale", "num_inference_steps")  # knobs that leave the fine-tuned generator as it is


def knob_settings(knobs: str, recorded: dict[str, object]):
    """A variant's settings: the run's `recorded` ones (`demo_settings.json`) with the variant's knobs, so a variant
    changes only what it names even when a default changed after the run was made."""
    import dataclasses

    from crfm.toy.demo import build_parser
    from crfm.toy.demo.settings import PRESETS, DemoSettings, check_knobs, recorded_knobs

    args = build_parser().parse_args(shlex.split(knobs))
    names = [f.name for f in dataclasses.fields(DemoSettings)]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    run = {k: v for k, v in recorded_knobs(recorded).items() if k in names}  # a knob since removed is dropped
    settings = DemoSettings(**{**run, **PRESETS[args.preset], **given})
    check_knobs(settings)
    return settings


def generator_owners(variants: dict[str, str], recorded: dict[str, object], run_base: Path) -> dict[str, str]:
    """variant -> the variant whose fine-tuning it uses: the first one with the same `fine_tuning_key` (`default`, no
    knobs, is the runs' own generator, so a variant that would reproduce it bit for bit uses the runs' own)."""
    owners: dict[str, str] = {}
    result = {}
    for name, knobs in variants.items():
        result[name] = owners.setdefault(fine_tuning_key(knob_settings(knobs, recorded), recorded, run_base), name)
    return result


def fine_tuning_key(settings, recorded: dict[str, object], run_base: Path) -> str:
    """What a fine-tuning depends on: the settings but `SAMPLING_KNOBS` and the seed, and of the base only its latent
    space: a base that differs from the run's (`run_base`, made from `recorded["base"]`) in its VAE decoder alone
    (`shares_latent_space`) fine-tunes exactly the run's generator, so it counts as the run's base."""
    import dataclasses

    from crfm.toy.demo.settings import pretrained_base

    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in (*SAMPLING_KNOBS, "seed")}
    base = pretrained_base(settings)
    if settings.base != recorded["base"] and base is not None and shares_latent_space(base, run_base):
        fields["base"] = recorded["base"]
    return json.dumps(fields, sort_keys=True)


def variant_dir(out: Path, variant: str, run: Path) -> Path:
    return out / variant / run.name


TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def check_same_text_encoders(base: Path, run_base: Path) -> None:
    """A variant with its own base (`--base FOLDER`) reuses the run's prompt vectors: only right when the two
    bases encode prompts alike, e.g. a base whose transformer alone was trained on (`--continue_pretraining_on`)."""
    for part in TEXT_PARTS:
        for file in sorted((run_base / part).iterdir()):
            if file.read_bytes() != (base / part / file.name).read_bytes():
                raise SystemExit(f"{base}: {part}/{file.name} differs from the run's; the run's vectors do not fit")


def prepare_and_sample(run: Path, variant: str, knobs: str, out: Path, owner: str) -> None:
    """One (variant, run): the generator fine-tuned with the variant's knobs (or `owner` variant's, the same
    fine-tuning), the validation masks synthesized."""
    from crfm.toy.demo.stages import Demo

    recorded = json.loads((run / "demo_settings.json").read_text())
    settings = knob_settings(knobs, recorded)
    folder = variant_dir(out, variant, run)
    folder.mkdir(parents=True, exist_ok=True)
    own_base = settings.base != recorded["base"]
    links = {name: run / name for name in SHARED if not (own_base and name == "tiny_sd35")}
    if owner == "default":
        links["train"] = run / "train"
    elif owner != variant:
        links["train"] = variant_dir(out, owner, run) / "train"
    for name, target in links.items():
        link = folder / name
        if target.exists() and not link.is_symlink():  # a run made `--until models` has no real mosaics
            link.symlink_to(target.resolve(), target_is_directory=True)
    demo = Demo(folder, settings, progress=False)
    if own_base and not (folder / "tiny_sd35").is_dir():
        demo.pipeline()
        check_same_text_encoders(folder / "tiny_sd35", run / "tiny_sd35")
    demo.generator_vectors()
    demo.generator(one_thread=True)
    for images, crfm in SYNTHESES.items():
        # One lane: this bench runs its own jobs side by side, so each synthesis keeps to one thread.
        demo.run_together([demo.synthesis_job("val_.jsonl", f"val_{images}", crfm, num_per_mask=PER_MASK)], lanes=1)
        judged = folder / f"val_{images}" / "judge.json"
        if not judged.is_file():
            run_logged([
                sys.executable, "-m", "crfm.segmentation.evaluate", "--data_root", str(folder / f"val_{images}"),
                "--json_file", "index.jsonl", "--num_cls", str(len(CLASSES)), "--device", "cpu",
                "--mmseg_config", str(run / "seg_judge" / "config.py"),
                "--mmseg_ckpt", str(run / "seg_judge" / "segmentor.pth"), "--no_progress", "--out", str(judged),
            ])  # fmt: skip


def detail_of(data_root: Path, resolution: int, index: str = "index.jsonl") -> float:
    """High-frequency energy (`crfm.fewstep.evaluate.detail`) of an index's images at `resolution` px."""
    import torch

    from crfm.data.dataset import image_to_tensor
    from crfm.fewstep.evaluate import detail

    items = read_index(data_root / index, data_root)
    images = [image_to_tensor(Image.open(data_root / item.target).convert("RGB"), resolution) for item in items]
    return detail(torch.stack(images))


def read_variant(folder: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    real_detail: dict[int, float] = {}  # side -> the real validation images' detail, computed once
    for images in SYNTHESES:
        path = folder / f"val_{images}" / "judge.json"
        if path.is_file():
            judged = json.loads(path.read_text())
            values[images] = 100 * judged["mIoU"]
            values.update({f"{images} IoU.{c}": 100 * v for c, v in zip(CLASSES, judged["IoU"], strict=True)})
            # Blur, which the judge does not see: the samples' high-frequency energy as a share of the real images'.
            synthetic = folder / f"val_{images}"
            first = read_index(synthetic / "index.jsonl", synthetic)[0]
            side = Image.open(synthetic / first.target).size[0]  # the real images at the generator's resolution
            if side not in real_detail:
                real_detail[side] = detail_of(folder / "toydata", side, "val.jsonl")
            values[f"{images} detail"] = detail_of(synthetic, side) / real_detail[side]
    summary = folder / "train" / "summary.json"
    if summary.is_file():
        trained = json.loads(summary.read_text())
        values["s/step"] = trained["seconds_per_step"]
        values["final loss"] = trained["final_loss"]
    return values


def table(results: dict[str, list[dict[str, float]]], reference: str = "default") -> str:
    """Mean ± std over runs of every quantity per variant, then each other variant's paired difference to
    `reference` (same run)."""
    parts = ("", *(f" IoU.{c}" for c in CLASSES), " detail")
    scores = [f"{images}{part}" for images in SYNTHESES for part in parts]
    keys = [*scores, "s/step", "final loss"]
    names = list(results)
    lines = ["| quantity | " + " | ".join(f"{n} ({len(results[n])} runs)" for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for key in keys:
        cells = [mean_std([r[key] for r in results[n] if key in r], digits=3 if key == "s/step" else 2) for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    base = results.get(reference)
    others = [n for n in names if n != reference]
    if base and others:
        lines += [
            "",
            f"Paired difference to `{reference}` (same run):",
            "",
            "| quantity | " + " | ".join(others) + " |",
        ]
        lines.append("|---|" + "---|" * len(others))
        for key in scores:
            cells = []
            for n in others:
                diffs = [r[key] - b[key] for r, b in zip(results[n], base, strict=True) if key in r and key in b]
                cells.append(mean_std(diffs))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", default=[], help="finished default demo runs")
    parser.add_argument("--variant", action="append", default=[], help='NAME="--knob value ..."')
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "generator_variants")
    parser.add_argument("--jobs", type=int, default=1, help="variants at once (each on one thread)")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument(
        "--reference", default="default", help="the variant the paired differences are taken to (default: the run's)"
    )
    parser.add_argument("--one", nargs=2, metavar=("RUN", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--knobs", default="", help=argparse.SUPPRESS)  # of --one
    parser.add_argument("--owner", default=None, help=argparse.SUPPRESS)  # of --one: whose fine-tuning
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.one:
        run, variant = args.one
        prepare_and_sample(Path(run).resolve(), variant, args.knobs, args.out.resolve(), args.owner or variant)
        return 0
    if not args.runs:
        parser.error("--runs: at least one finished demo run")
    variants = {"default": "", **dict(v.split("=", 1) for v in args.variant)}
    if args.reference not in variants:
        parser.error(f"--reference {args.reference}: not a variant ({', '.join(variants)})")
    first = args.runs[0]  # the runs are seeds of one setting: their bases agree
    owners = generator_owners(variants, json.loads((first / "demo_settings.json").read_text()), first / "tiny_sd35")
    jobs = []
    for name, knobs in variants.items():
        for run in args.runs:
            log = variant_dir(args.out, name, run).with_suffix(".log")
            cmd = [sys.executable, __file__, "--out", str(args.out), "--one", str(run), name, f"--knobs={knobs}"]
            owner = owners[name]
            after = [] if owner in (name, "default") else [f"{owner}/{run.name}"]
            jobs.append(Job(f"{name}/{run.name}", after, partial(run_logged, [*cmd, "--owner", owner], log)))
    run_jobs_or_exit(jobs, args.jobs)
    results = {name: [read_variant(variant_dir(args.out, name, run)) for run in args.runs] for name in variants}
    print_table(
        table(results, args.reference), args.table, "python bench/generator_variants.py " + shlex.join(sys.argv[1:])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
