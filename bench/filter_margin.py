"""The filter's tolerance margin and the real images it measures the guide's class losses on, on the VALIDATION
scenes of finished demo runs.

    python bench/filter_margin.py outputs/heldout_steps/steps1800/seed0 outputs/heldout_steps/steps1800/seed1 \\
        outputs/heldout_steps/steps1800/seed2 --margins 1.5 2.0 --out outputs/filter_margin   # ~27 min; resumable
    python bench/filter_margin.py ... --reference ref_vae --out outputs/filter_margin                 # ~25 min more
    python bench/filter_margin.py outputs/fresh/seed3 outputs/fresh/seed4 outputs/fresh/seed5 \\
        --reference ref_vae_layouts --out outputs/filter_per_set                  # fresh runs made --until filter

FreeMask ignores a synthetic pixel whose loss under the guide exceeds `--tolerance_margin` times the guide's mean
loss of its class on the labelled scenes (the ones the guide was trained on). bench/layout_gap.py found the demo's
1.25 dropping a third of the pixels of real images it had not memorised. Per run and margin, into `--out/mM/seedS`
(links to the run's parts; the run's own margin reuses its filtered sets), every filtered set of the default demo
filtered again and the rows that draw on them, by the demo's row recipes (`Demo.mixed_run`), scored on `val.jsonl`,
never on the held-out scenes: the paper's recipe (CRFM x3 of the labelled masks), the new layouts, and the union of
real mosaics and new layouts. `--reference` adds variants at the run's margin whose class means are measured on the
run's real mosaics through its VAE (`mosaics_vae`, made from the labelled pairs alone: real images as the generator
at best could draw them, in arrangements the guide was not trained on): `ref_vae` for every filtered set,
`ref_vae_layouts` for the new layouts only (the labelled masks' x3 keep the demo's filter).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

LINKED = ("toydata", "tiny_sd35", "train", "seg_real", "vectors", "layouts_real", "synth_train", "synth_layouts")
ROWS = ("real_synth_filtered", "real_synth_layouts", "real_mosaic_synth_layouts")  # demo rows, by key
FILTERED = ("synth_train", "synth_layouts")  # the default demo's filtered sets: the labelled masks x3, the new layouts
REFERENCE_VARIANTS = {"ref_vae": FILTERED, "ref_vae_layouts": ("synth_layouts",)}


def on_reference(flags: list[object], reference: Path) -> list[object]:
    """The demo's filter flags, but the class means measured on the dataset at `reference` (its index.jsonl): appended,
    as the last of a repeated flag wins."""
    return [*flags, "--data_root", reference, "--json_file", "index.jsonl"]


def variant_demo(run: Path, out: Path, margin: float, run_margin: float, reference_sets: tuple[str, ...] = ()):
    """A `Demo` on the run at `margin`, the sets in `reference_sets` filtered with the class means of the run's real
    mosaics through its VAE (`real_mosaic_sets`, made in `out`): a set filtered as the run did (at `run_margin`, the
    run's) is the run's own, linked; the others are filtered again."""
    from crfm.toy.demo.experiments import linked_demo, real_mosaic_sets
    from crfm.toy.demo.rows import MOSAICS_AND_SYNTH

    as_run = [synth for synth in FILTERED if margin == run_margin and synth not in reference_sets]
    own = [f"{synth}_filtered" for synth in as_run] + ([MOSAICS_AND_SYNTH[0]] if len(as_run) == len(FILTERED) else [])
    demo = linked_demo(run, out, [*LINKED, *own], tolerance_margin=margin)
    if reference_sets:
        real_mosaic_sets(demo)
    pending = []
    for synth in FILTERED:
        if synth in as_run or demo.path(f"{synth}_filtered", "index.jsonl").is_file():
            continue
        log, module, flags = demo.filter_job(synth)
        reference = synth in reference_sets
        pending.append((log, module, on_reference(flags, demo.path("mosaics_vae")) if reference else flags))
    demo.run_together(pending)
    if len(as_run) < len(FILTERED):
        demo.union_dataset(*MOSAICS_AND_SYNTH)
    return demo


def segmentors(demo) -> list[tuple[str, list[object]]]:
    import dataclasses

    from crfm.toy.demo.rows import ROWS as DEMO_ROWS

    return [demo.mixed_run(dataclasses.replace(DEMO_ROWS[key], work=f"val_{key}"), val="val.jsonl") for key in ROWS]


def main(argv: list[str] | None = None) -> int:
    from crfm.toy.demo.experiments import experiment_parser, paired
    from crfm.toy.demo.settings import SETTINGS_FILE, recorded_knobs
    from crfm.utils.runs import mean_std

    parser = experiment_parser(__doc__)
    parser.add_argument("--margins", nargs="*", type=float, default=[], help="candidates beside the runs' own")
    parser.add_argument(
        "--reference", nargs="*", default=[], choices=sorted(REFERENCE_VARIANTS),
        help="class means on the real mosaics through the VAE: for every filtered set, or the new layouts only",
    )  # fmt: skip
    args = parser.parse_args(argv)
    (margin,) = {recorded_knobs(json.loads((run / SETTINGS_FILE).read_text()))["tolerance_margin"] for run in args.runs}
    variants = {"control": (margin, ()), **{f"m{m:g}": (m, ()) for m in args.margins if m != margin}}
    variants |= {name: (margin, REFERENCE_VARIANTS[name]) for name in args.reference}
    scores: dict[tuple[str, str], list[float]] = {}
    for run in args.runs:
        folders = {name: args.out / (f"m{margin:g}" if name == "control" else name) / run.name for name in variants}
        demos = {name: variant_demo(run, folders[name], m, margin, sets) for name, (m, sets) in variants.items()}
        # Every variant's segmentors in one queue (each logs in its own folder), so no lane idles between them.
        jobs = [demo.job(work, "crfm.segmentation.downstream", flags) for demo in demos.values()
                for work, flags in segmentors(demo) if not demo.path(work, "metrics.json").is_file()]  # fmt: skip
        next(iter(demos.values())).run_together(jobs, lanes=args.lanes)
        for name, demo in demos.items():
            for key in ROWS:
                metrics = json.loads(demo.path(f"val_{key}", "metrics.json").read_text())
                scores.setdefault((name, key), []).append(metrics["mIoU"])
    print("| validation mIoU (%) | filter | " + " | ".join(run.name for run in args.runs) + " | mean ± std |")
    print("|---" * (len(args.runs) + 3) + "|")
    for (name, key), values in scores.items():
        print(f"| {key} | {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {mean_std(values)} |")
    print(f"\nPaired with the control (margin {margin:g}), by run:")
    for name in list(variants)[1:]:
        for key in ROWS:
            print(f"- {name}, {key}: {paired(scores[name, key], scores['control', key])}")
        differences = [a - b for k in ROWS for a, b in zip(scores[name, k], scores["control", k], strict=True)]
        print(f"- {name}, mean over the rows: {statistics.mean(differences):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
