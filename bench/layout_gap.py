"""Where the generator's new layouts lose to copy-paste: the real mosaics at the generator's resolution, then through
its VAE, then filtered like the synthetic layouts (held-out scenes of finished demo runs; a measurement, no choice).

    python bench/layout_gap.py outputs/heldout_steps/steps1800/seed0 outputs/heldout_steps/steps1800/seed1 \\
        outputs/heldout_steps/steps1800/seed2 --out outputs/layout_gap          # ~20 min on 2 cores; resumable

The demo's rows real + real mosaics (`seg_real_mosaic`, the 128 px mosaics cut from the labelled pairs) and real +
CRFM new layouts, filtered (`seg_real_synth_layouts`, the generator's 64 px images of the same masks) differ in
three things at once. Per run, into `--out/seedS` (links to the run's parts; a set whose index exists and a segmentor
whose metrics.json exists are kept), the same masks' real images one step at a time, each trained by the demo's own
row recipe (`Demo.mixed_run`) and scored on the held-out scenes:

- `gap_mosaic_64`: the real mosaics at the generator's resolution (image and mask as the generator's data loader
  resizes them): what the resolution alone costs;
- `gap_mosaic_vae`: those images through the run's VAE (encode, posterior mode, decode), the ceiling of any image
  the generator decodes;
- `gap_mosaic_vae_filtered`: those, filtered by the run's guide as the synthetic layouts are (FreeMask, the demo's
  filter settings).

What is left between the last row and `seg_real_synth_layouts` is the generator's own share (its images are not the
real ones of their masks).
"""

from __future__ import annotations

LINKED = ("toydata", "tiny_sd35", "train", "seg_real", "vectors", "layouts_real", "seg_real_mosaic",
          "seg_real_synth_layouts")  # fmt: skip
MOSAICS_64, MOSAICS_VAE = "mosaics_64", "mosaics_vae"
# (row label, segmentor work dir); the first and the last are the run's own demo rows.
ROWS = (
    ("real + real mosaics (128 px; the demo's row)", "seg_real_mosaic"),
    ("… at the generator's 64 px", "gap_mosaic_64"),
    ("… through the VAE", "gap_mosaic_vae"),
    ("… filtered by the guide", "gap_mosaic_vae_filtered"),
    ("real + CRFM new layouts, filtered (the demo's row)", "seg_real_synth_layouts"),
)


def image_sets(demo) -> None:
    """The real mosaics at the generator's resolution, through the VAE, and those filtered."""
    from crfm.toy.demo.experiments import real_mosaic_sets

    real_mosaic_sets(demo, MOSAICS_64, MOSAICS_VAE)
    if not demo.path(f"{MOSAICS_VAE}_filtered", "index.jsonl").is_file():
        demo.run_together([demo.filter_job(MOSAICS_VAE)])


def segmentors(demo) -> list[tuple[str, list[object]]]:
    """The three steps' rows (their sets made first), and the run's own two rows (linked, so kept) by the same
    recipe."""
    from crfm.toy.demo.rows import ROWS as DEMO_ROWS
    from crfm.toy.demo.rows import DownstreamRow

    sets = {"gap_mosaic_64": MOSAICS_64, "gap_mosaic_vae": MOSAICS_VAE,
            "gap_mosaic_vae_filtered": f"{MOSAICS_VAE}_filtered"}  # fmt: skip
    image_sets(demo)
    steps = [DownstreamRow(work, work, work, synthetic) for work, synthetic in sets.items()]
    return [demo.mixed_run(row) for row in (DEMO_ROWS["real_mosaic"], *steps, DEMO_ROWS["real_synth_layouts"])]


def main(argv: list[str] | None = None) -> int:
    from crfm.toy.demo.experiments import experiment_parser, paired, segmentor_metrics
    from crfm.toy.toydata import CLASSES
    from crfm.utils.runs import mean_std

    args = experiment_parser(__doc__).parse_args(argv)
    metrics = segmentor_metrics(args, LINKED, segmentors)
    print("| held-out mIoU (%) | " + " | ".join(run.name for run in args.runs) + " | mean ± std | "
          + " | ".join(CLASSES) + " |")  # fmt: skip
    print("|---" * (len(args.runs) + 2 + len(CLASSES)) + "|")
    for label, work in ROWS:
        miou = [m["mIoU"] for m in metrics[work]]
        per_class = [mean_std([m[f"IoU.{name}"] for m in metrics[work]]) for name in CLASSES]
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in miou) + f" | {mean_std(miou)} | " + " | ".join(per_class)
              + " |")  # fmt: skip
    print("\nPaired steps (mean ± std over runs):")
    for (before, first), (after, second) in zip(ROWS, ROWS[1:], strict=False):
        miou = {work: [m["mIoU"] for m in metrics[work]] for work in (first, second)}
        print(f"- {after}  −  {before}: {paired(miou[second], miou[first])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
