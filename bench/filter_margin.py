"""The filter's tolerance margin, on the VALIDATION scenes of finished demo runs.

    python bench/filter_margin.py outputs/heldout_steps/steps1800/seed0 outputs/heldout_steps/steps1800/seed1 \\
        outputs/heldout_steps/steps1800/seed2 --margins 1.5 2.0 --out outputs/filter_margin   # ~25 min; resumable

FreeMask ignores a synthetic pixel whose loss under the guide exceeds `--tolerance_margin` times the guide's mean
loss of its class on the labelled scenes (the ones the guide was trained on). bench/layout_gap.py found the demo's
1.25 dropping a third of the pixels of real images it had not memorised. Per run and margin, into `--out/mM/seedS`
(links to the run's parts; the run's own margin reuses its filtered sets), every filtered set of the default demo
filtered again and the rows that draw on them, by the demo's row recipes (`Demo.mixed_run`), scored on `val.jsonl`,
never on the held-out scenes: the paper's recipe (CRFM x3 of the labelled masks), the new layouts, and the union of
real mosaics and new layouts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

LINKED = ("toydata", "tiny_sd35", "train", "seg_real", "vectors", "layouts_real", "synth_train", "synth_layouts")
ROWS = ("real_synth_filtered", "real_synth_layouts", "real_mosaic_synth_layouts")  # demo rows, by key


def margin_demo(run: Path, out: Path, margin: float):
    """A `Demo` on the run at `margin`: the run's filtered sets where it is the run's margin, else filtered again."""
    from crfm.toy.demo.experiments import linked_demo
    from crfm.toy.demo.rows import MOSAICS_AND_SYNTH

    demo = linked_demo(run, out, LINKED, tolerance_margin=margin)
    recorded = json.loads((run / "demo_settings.json").read_text())["tolerance_margin"]
    if margin == recorded:
        for synth in (*(f"{s}_filtered" for s in ("synth_train", "synth_layouts")), MOSAICS_AND_SYNTH[0]):
            if not (out / synth).exists():
                (out / synth).symlink_to(run.resolve() / synth)
        return demo
    pending = [demo.filter_job(s) for s in ("synth_train", "synth_layouts")
               if not demo.path(f"{s}_filtered", "index.jsonl").is_file()]  # fmt: skip
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
    parser.add_argument("--margins", nargs="+", type=float, required=True, help="candidates beside the runs' own")
    args = parser.parse_args(argv)
    own = {json.loads((run / "demo_settings.json").read_text())["tolerance_margin"] for run in args.runs}
    margins = [*sorted(own), *(m for m in args.margins if m not in own)]
    scores: dict[tuple[float, str], list[float]] = {}
    for run in args.runs:
        demos = [margin_demo(run, args.out / f"m{margin:g}" / run.name, margin) for margin in margins]
        # Every margin's segmentors in one queue (each logs in its own folder), so no lane idles between margins.
        jobs = [demo.job(work, "crfm.segmentation.downstream", flags) for demo in demos
                for work, flags in segmentors(demo) if not demo.path(work, "metrics.json").is_file()]  # fmt: skip
        demos[0].run_together(jobs, lanes=args.lanes)
        for margin, demo in zip(margins, demos, strict=True):
            for key in ROWS:
                metrics = json.loads(demo.path(f"val_{key}", "metrics.json").read_text())
                scores.setdefault((margin, key), []).append(metrics["mIoU"])
    print("| validation mIoU (%) | margin | " + " | ".join(run.name for run in args.runs) + " | mean ± std |")
    print("|---" * (len(args.runs) + 3) + "|")
    for (margin, key), values in scores.items():
        print(f"| {key} | {margin:g} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {spread(values)} |")
    reference = margins[0]
    print(f"\nPaired with margin {reference:g}, by run:")
    for margin in margins[1:]:
        for key in ROWS:
            print(f"- {margin:g}, {key}: {paired(scores[margin, key], scores[reference, key])}")
        differences = [a - b for k in ROWS for a, b in zip(scores[margin, k], scores[reference, k], strict=True)]
        print(f"- {margin:g}, mean over the rows: {statistics.mean(differences):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
