"""The filter's tolerance margin and the real images it measures the guide's class losses on, on the VALIDATION
scenes of finished demo runs.

    python bench/filter_margin.py outputs/heldout_steps/steps1800/seed0 outputs/heldout_steps/steps1800/seed1 \\
        outputs/heldout_steps/steps1800/seed2 --margins 1.5 2.0 --out outputs/filter_margin   # ~27 min; resumable
    python bench/filter_margin.py ... --reference outputs/layout_gap --out outputs/filter_margin       # ~25 min more

FreeMask ignores a synthetic pixel whose loss under the guide exceeds `--tolerance_margin` times the guide's mean
loss of its class on the labelled scenes (the ones the guide was trained on). bench/layout_gap.py found the demo's
1.25 dropping a third of the pixels of real images it had not memorised. Per run and margin, into `--out/mM/seedS`
(links to the run's parts; the run's own margin reuses its filtered sets), every filtered set of the default demo
filtered again and the rows that draw on them, by the demo's row recipes (`Demo.mixed_run`), scored on `val.jsonl`,
never on the held-out scenes: the paper's recipe (CRFM x3 of the labelled masks), the new layouts, and the union of
real mosaics and new layouts. With `--reference FOLDER` (bench/layout_gap.py's `--out`), one more variant, `ref_vae`
at the run's margin: the class means measured on the run's real mosaics through its VAE (`FOLDER/seedS/mosaics_vae`),
real images rendered as the generator at best could, in arrangements the guide was not trained on.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

LINKED = ("toydata", "tiny_sd35", "train", "seg_real", "vectors", "layouts_real", "synth_train", "synth_layouts")
ROWS = ("real_synth_filtered", "real_synth_layouts", "real_mosaic_synth_layouts")  # demo rows, by key


def on_reference(flags: list[object], reference: Path) -> list[object]:
    """The demo's filter flags, but the class means measured on the dataset at `reference` (its index.jsonl): appended,
    as the last of a repeated flag wins."""
    return [*flags, "--data_root", reference, "--json_file", "index.jsonl"]


def variant_demo(run: Path, out: Path, margin: float, reference: Path | None = None):
    """A `Demo` on the run at `margin` (and the class means on `reference`'s images): the run's filtered sets where
    both are the run's, else every set filtered again."""
    from crfm.toy.demo.experiments import linked_demo
    from crfm.toy.demo.rows import MOSAICS_AND_SYNTH

    demo = linked_demo(run, out, LINKED, tolerance_margin=margin)
    recorded = json.loads((run / "demo_settings.json").read_text())["tolerance_margin"]
    if margin == recorded and reference is None:
        for synth in (*(f"{s}_filtered" for s in ("synth_train", "synth_layouts")), MOSAICS_AND_SYNTH[0]):
            if not (out / synth).exists():
                (out / synth).symlink_to(run.resolve() / synth)
        return demo
    pending = []
    for synth in ("synth_train", "synth_layouts"):
        if demo.path(f"{synth}_filtered", "index.jsonl").is_file():
            continue
        log, module, flags = demo.filter_job(synth)
        pending.append((log, module, flags if reference is None else on_reference(flags, reference)))
    demo.run_together(pending)
    demo.union_dataset(*MOSAICS_AND_SYNTH)
    return demo


def segmentors(demo) -> list[tuple[str, list[object]]]:
    import dataclasses

    from crfm.toy.demo.rows import ROWS as DEMO_ROWS

    return [demo.mixed_run(dataclasses.replace(DEMO_ROWS[key], work=f"val_{key}"), val="val.jsonl") for key in ROWS]


def main(argv: list[str] | None = None) -> int:
    from crfm.toy.demo.experiments import experiment_parser, paired, spread

    parser = experiment_parser(__doc__)
    parser.add_argument("--margins", nargs="*", type=float, default=[], help="candidates beside the runs' own")
    parser.add_argument("--reference", type=Path, help="bench/layout_gap.py's --out: the `ref_vae` variant too")
    args = parser.parse_args(argv)
    own = {json.loads((run / "demo_settings.json").read_text())["tolerance_margin"] for run in args.runs}
    (margin,) = own  # the runs of one default
    variants = {"control": (margin, False), **{f"m{m:g}": (m, False) for m in args.margins if m != margin}}
    if args.reference:
        variants["ref_vae"] = (margin, True)
    scores: dict[tuple[str, str], list[float]] = {}
    for run in args.runs:
        demos = {
            name: variant_demo(run, args.out / (f"m{margin:g}" if name == "control" else name) / run.name, m,
                               args.reference / run.name / "mosaics_vae" if ref else None)
            for name, (m, ref) in variants.items()
        }  # fmt: skip
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
        print(f"| {key} | {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {spread(values)} |")
    print(f"\nPaired with the control (margin {margin:g}), by run:")
    for name in list(variants)[1:]:
        for key in ROWS:
            print(f"- {name}, {key}: {paired(scores[name, key], scores['control', key])}")
        differences = [a - b for k in ROWS for a, b in zip(scores[name, k], scores["control", k], strict=True)]
        print(f"- {name}, mean over the rows: {statistics.mean(differences):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
