"""The demo's report: summary.json, summary.md (mask fidelity, downstream rows, IoU per class, stage times) and
samples.png (mask | plain | CRFM paper | CRFM default | few-step | real at both sizes)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from crfm.toy.demo.rows import DOWNSTREAM, FEW_STEP, FIGURE_TITLES, IMAGE_SETS, SYNTHESES, TSTR
from crfm.toy.demo.settings import DemoSettings, judge_val_scenes
from crfm.toy.demo.stages import Demo
from crfm.utils.fileio import write_text_atomic


def write_report(demo: Demo) -> dict:
    """summary.json, summary.md and samples.png of a finished run; returns the summary with its markdown."""
    from crfm.toy.toydata import CLASSES

    def fid(images: str, judge: str) -> dict:
        return json.loads(demo.path("fidelity", f"{images}_{judge}.json").read_text())

    def seg(work: str) -> dict:
        return json.loads(demo.path(work, "metrics.json").read_text())

    train_summary = json.loads(demo.path("train", "summary.json").read_text())
    fidelity = {}
    for images in (*IMAGE_SETS, FEW_STEP[0]) if demo.s.few_step else IMAGE_SETS:
        judge, guide = fid(images, "seg_judge"), fid(images, "seg_real")
        fidelity[images] = {
            "judge_mIoU": 100 * judge["mIoU"],
            "guide_mIoU": 100 * guide["mIoU"],
            "judge_IoU": dict(zip(CLASSES, judge["IoU"], strict=True)),
        }
    summary = {
        "settings": dataclasses.asdict(demo.s),
        "generator": train_summary,
        "mask_fidelity": fidelity,
        "downstream": {
            **{row.key: seg(row.work) for row in demo.rows()},
            # Train on synthetic / on real, test on real: the same masks, the real-only run's recipe.
            **({"tstr": seg(TSTR), "trtr": seg("seg_real")} if demo.s.ablations else {}),
        },
        "filter": {
            synth: json.loads(demo.path(f"{synth}_filtered", "filter_report.json").read_text())
            for synth in demo.filtered_sets()
        },
        "stage_seconds": dict(demo.timings),
        "total_seconds": round(sum(demo.timings.values()), 1),
    }
    write_text_atomic(demo.path("summary.json"), json.dumps(summary, indent=2) + "\n")
    markdown = summary_markdown(summary)
    write_text_atomic(demo.path("summary.md"), markdown)
    write_figure(demo)
    return summary | {"markdown": markdown}


def write_figure(demo: Demo) -> None:
    """samples.png: mask | each held-out synthesis | real, for the first `figure_rows` held-out masks. Where the
    generator works below the scenes' size, the real image is also shown at its resolution: what it learns from
    (the world's crop rows keep 7 % of their energy at 64 px, bench/results_crop_rows.md)."""
    from PIL import Image

    from crfm.data.dataset import load_label, resize_center_crop
    from crfm.data.index import read_index
    from crfm.toy.toydata import PALETTE
    from crfm.utils.viz import colourise_mask, image_grid

    root = demo.path("toydata")
    real = {item.source: item.target for item in read_index(root / "test.jsonl", root)}

    def by_mask(work: str) -> dict[str, Path]:
        items = read_index(demo.path(work, "index.jsonl"))
        return {i.record["source_mask"]: demo.path(work, i.target) for i in items if i.record["variant"] == 0}

    works = [work for work, _ in SYNTHESES.values()] + ([FEW_STEP[1]] if demo.s.few_step else [])
    synthesized = [by_mask(work) for work in works]
    size = demo.s.scene_size
    rows = []
    for source in list(real)[: demo.s.figure_rows]:
        mask = colourise_mask(load_label(root / source), PALETTE)
        samples = [Image.open(images[source]).convert("RGB") for images in synthesized]
        image = Image.open(root / real[source]).convert("RGB")
        if demo.s.resolution != size:  # resized as every stage resizes (image_to_tensor)
            samples.append(resize_center_crop(image, demo.s.resolution, Image.Resampling.BICUBIC))
        rows.append([Image.fromarray(mask), *samples, image])
    image_grid(rows, figure_titles(demo.s), cell=size, resample=Image.Resampling.NEAREST).save(demo.path("samples.png"))


def figure_titles(settings: DemoSettings) -> list[str]:
    titles = list(FIGURE_TITLES)
    if settings.few_step:
        titles.insert(-1, f"{settings.few_step}-step student")
    if settings.resolution != settings.scene_size:
        titles[-1:] = [f"real, {settings.resolution} px", f"real, {settings.scene_size} px"]
    return titles


ROW_NAMES = {
    "real": "real held-out images (reference)",
    "vae": "real images through the VAE (the ceiling)",
    "plain": "plain sampling",
    "crfm_paper": "CRFM, paper settings (the first {paper_rectified} of {steps} steps, eta_max "
    "{paper.max_step_size:g}, clamp {paper.velocity_clamp:g})",
    "crfm": "CRFM, test.py defaults (the first {rectified} of {steps} steps x {num_rectified}, eta_max "
    "{max_step_size:g}, L2-normalised {l2_norm}, clamp {velocity_clamp:g}, {views} view(s))",
    FEW_STEP[0]: "few-step: {student} student of the CRFM teacher, {few_step} Euler step(s), no segmentor",
}


def per_class_table(down: dict) -> list[str]:
    """Markdown lines: IoU (%) per class of every downstream row (what the mean hides: which classes a data source
    helps); none for rows trained before the segmentors reported classes."""
    classes = [key.removeprefix("IoU.") for key in down["real_only"] if key.startswith("IoU.")]
    if not classes or any(f"IoU.{name}" not in row for row in down.values() for name in classes):
        return []

    def cell(value: float) -> str:
        return "–" if math.isnan(value) else f"{value:.1f}"

    lines = ["IoU (%) per class on the held-out scenes:", "", "| row | " + " | ".join(classes) + " |"]
    lines.append("|---|" + "---|" * len(classes))
    for key, row in down.items():
        if key == "trtr":  # the real-only run again
            continue
        lines.append(f"| `{key}` | " + " | ".join(cell(row[f"IoU.{name}"]) for name in classes) + " |")
    return [*lines, ""]


def summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    fid, down = summary["mask_fidelity"], summary["downstream"]
    held_out = s["test_scenes"]
    judge_train = s["judge_scenes"] - judge_val_scenes(s["judge_scenes"])
    lines = [
        "# crfm demo summary",
        "",
        f"Base: {s['base']}; mask encoding: {s['mask_encoding']}; generator fine-tuned on {s['train_scenes']} "
        "labelled scenes.",
        "",
        f"Mask fidelity on {held_out} held-out masks: mIoU (%) of a segmentor's prediction on the images against "
        f"the masks they were drawn from. The judge was trained on {judge_train} separate toy scenes (another seed) "
        "and never guided sampling; the guide is the real-only segmentor below.",
        "",
        "| images | judge mIoU | guide mIoU |",
        "|---|---|---|",
    ]
    from crfm.sampling.rectify import CRFMConfig

    crfm, paper, steps = dataclasses.asdict(CRFMConfig()), CRFMConfig.paper(), s["num_inference_steps"]
    names = dict(  # CRFM rectifies at most every step of the run
        crfm, steps=steps, rectified=min(crfm["rectified_step"], steps), paper=paper,
        paper_rectified=min(paper.rectified_step, steps), few_step=s["few_step"],
        student="2-RF" if s["reflow_segments"] == 1 else f"{s['reflow_segments']}-SeqRF",
    )  # fmt: skip
    for key, name in ROW_NAMES.items():
        if key not in fid:  # the few-step row, with --few_step 0
            continue
        name = name.format(**names)
        lines.append(f"| {name} | {fid[key]['judge_mIoU']:.2f} | {fid[key]['guide_mIoU']:.2f} |")
    real = down["real_only"]
    lines += [
        "",
        f"Downstream ({Path(s['seg_config']).stem}): mIoU (%) on the {held_out} held-out real scenes. Mixed runs "
        f"draw {100 * s['synth_ratio']:.0f}% synthetic samples and run longer, so each real image is seen as often as "
        "in the real-only run; the union of real mosaics and synthetic layouts draws each as often as the one-set rows "
        "draw theirs (so it runs longer still)"
        + ("; the extra-real run has the one-set mixed runs' iterations." if "real_extra" in down else "."),
        "",
        "| training data | images | iterations | mIoU | aAcc | − real only |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in ((row.key, row.name) for row in DOWNSTREAM if row.key in down):
        row = down[key]
        images = f"{row['real_train']} + {row['synthetic_train']}" if row["synthetic_train"] else f"{row['real_train']}"
        delta = "" if key == "real_only" else f"{row['mIoU'] - real['mIoU']:+.2f}"
        iters = row.get("iters", s["seg_iters"])
        lines.append(f"| {name} | {images} | {iters} | {row['mIoU']:.2f} | {row['aAcc']:.2f} | {delta} |")
    filtered = summary["filter"]["synth_train"]
    lines.append("")
    if "tstr" in down:
        tstr, trtr = down["tstr"]["mIoU"], down["trtr"]["mIoU"]
        lines.append(
            f"Train on synthetic, test on real (TSTR, {down['tstr']['synthetic_train']} CRFM pairs of the labelled "
            f"masks): {tstr:.2f} mIoU; train on the real pairs of the same masks (TRTR): {trtr:.2f}; ratio "
            f"{tstr / trtr:.2f}."
        )
    lines += [
        f"The filter ignored {100 * filtered['overall_filtered_fraction']:.1f}% of the CRFM pixels "
        f"(tolerance margin {s['tolerance_margin']:g}).",
        "",
        *per_class_table(down),
        f"Generator: {summary['generator']['steps']} steps, final training loss "
        f"{summary['generator']['final_loss']:.4f}, {summary['generator']['seconds_per_step']:.3f} s/step.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {sec:.0f} |" for name, sec in summary["stage_seconds"].items()),
        f"| **total** | **{summary['total_seconds']:.0f}** |",
        "",
    ]
    return "\n".join(lines)
