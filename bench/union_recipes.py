"""How the union of real mosaics and synthetic layouts should be drawn, on the VALIDATION scenes of finished demo runs.

    python bench/union_recipes.py outputs/heldout_steps/steps1800/seed0 outputs/heldout_steps/steps1800/seed1 \
        outputs/heldout_steps/steps1800/seed2 --out outputs/distinct

Per run, into `--out/seedS` (links to the run's data, generator, guide and sets; resumable: a segmentor whose
metrics.json exists is kept), the demo's downstream recipe (`Demo.segmentor_args`) scored on `val.jsonl`, never on
the held-out scenes:

- `val_mosaic`: real + real mosaics, 50 % of the draws (the demo's control row), and `val_mosaic3000` the same at
  3000 iterations (what a longer run alone gives);
- `val_union_same`: real + the run's union (real mosaics + filtered CRFM layouts of the same masks) as one set at 50 %
  (the demo's union row before the eighteenth session);
- `val_union_distinct`: the union with CRFM layouts of 48 *other* mosaics (layouts seed + 1000: synthesized with the
  run's generator at the demo's settings, filtered by its guide);
- `val_union_additive`: the run's union with each part drawn as often as the mosaic row draws its set
  (`DownstreamRow.synthetic_share`, 2/3 at 50 %: 3000 iterations), the recipe adopted (bench/results_layouts.md).
"""

from __future__ import annotations

LINKED = ("toydata", "tiny_sd35", "train", "seg_real", "vectors", "layouts_real", "mosaics_and_synth_layouts")
OTHER_LAYOUTS_SEED = 1000  # added to the run's seed: mosaics other than the real ones
ROWS = ("val_mosaic", "val_mosaic3000", "val_union_same", "val_union_distinct", "val_union_additive")


def other_layouts(demo) -> str:
    """CRFM images of 48 other mosaics of the labelled masks, filtered; then their union with the real mosaics."""
    demo.mosaics("layouts_b", seed=demo.s.seed + OTHER_LAYOUTS_SEED)
    if not demo.path("layouts_b", "index_.jsonl").is_file():
        demo.run_together([demo.vectorize_job("layouts_b", "vectors_layouts_b")])
    if not demo.path("synth_layouts_b", "synthesis.json").is_file():
        synthesis = demo.synthesis_job(
            "index_.jsonl", "synth_layouts_b", "default", root="layouts_b", vectors="vectors_layouts_b"
        )
        demo.run_together([synthesis])
    if not demo.path("synth_layouts_b_filtered", "index.jsonl").is_file():
        demo.run_together([demo.filter_job("synth_layouts_b")])
    demo.union_dataset("union_distinct", ["layouts_real/index.jsonl", "synth_layouts_b_filtered/index.jsonl"])
    return "union_distinct"


def segmentors(demo, distinct: str) -> list[tuple[str, list[object]]]:
    from crfm.segmentation.downstream import exposure_matched_iters
    from crfm.toy.demo.rows import ROWS as DEMO_ROWS

    config = demo.s.config_path(demo.s.seg_config)
    ratio = demo.s.synth_ratio
    union = DEMO_ROWS["real_mosaic_synth_layouts"]

    def mixed(work: str, synthetic: str, share: float, iters: int | None = None) -> tuple[str, list[object]]:
        return (work, demo.segmentor_args(
            work, demo.s.seed, "--synth_root", demo.path(synthetic), "--synth_ratio", share, "--match_real_exposure",
            config=config, val="val.jsonl", iters=iters,
        ))  # fmt: skip

    additive = union.synthetic_share(ratio)
    # The control: the mosaic row run as long as the additive union (its requested iterations, before the exposure
    # matching of `--match_real_exposure` divides them by the real share).
    control_request = round(exposure_matched_iters(demo.s.seg_iters, 1 - additive) * (1 - ratio))
    return [
        mixed("val_mosaic", "layouts_real", ratio),
        mixed("val_mosaic3000", "layouts_real", ratio, control_request),
        mixed("val_union_same", "mosaics_and_synth_layouts", ratio),
        mixed("val_union_distinct", distinct, ratio),
        mixed("val_union_additive", "mosaics_and_synth_layouts", additive),
    ]


def main(argv: list[str] | None = None) -> int:
    from crfm.toy.demo.experiments import experiment_parser, segmentor_metrics
    from crfm.utils.runs import mean_std

    args = experiment_parser(__doc__).parse_args(argv)
    metrics = segmentor_metrics(args, LINKED, lambda demo: segmentors(demo, other_layouts(demo)))
    print("| validation mIoU (%) | " + " | ".join(run.name for run in args.runs) + " | mean ± std |")
    print("|---" * (len(args.runs) + 2) + "|")
    for row in ROWS:
        values = [m["mIoU"] for m in metrics[row]]
        print(f"| {row} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {mean_std(values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
