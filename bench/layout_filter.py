"""Should the generator's new layouts be filtered? On the VALIDATION scenes of finished demo runs.

    python bench/layout_filter.py outputs/heldout_steps/steps1800/seed0 outputs/heldout_steps/steps1800/seed1 \\
        outputs/heldout_steps/steps1800/seed2 --out outputs/layout_filter     # ~17 min on 2 cores; resumable

bench/layout_gap.py found the FreeMask filter ignoring a third or more of the pixels of real mosaics (most of their
buildings) once they have been through the VAE. Per run, into `--out/seedS` (links to the run's parts; a set whose
index exists and a segmentor whose metrics.json exists are kept), the demo's row recipes (`Demo.mixed_run`) scored
on `val.jsonl`, never on the held-out scenes:

- `val_mosaic`: real + real mosaics (the control);
- `val_layouts` / `val_layouts_unfiltered`: real + CRFM new layouts, filtered (the demo's row) / unfiltered;
- `val_layouts_plain` / `val_layouts_plain_unfiltered`: the same with plain layouts (the same masks and noise, no
  guide while sampling; synthesized here if missing): CRFM − plain with and without the filter;
- `val_union` / `val_union_unfiltered`: real + real mosaics + CRFM new layouts, filtered (the demo's row) /
  unfiltered, each part drawn as often as the mosaic row's.
"""

from __future__ import annotations

LINKED = ("toydata", "tiny_sd35", "train", "seg_real", "vectors", "layouts", "vectors_layouts", "layouts_real",
          "synth_layouts", "synth_layouts_filtered", "mosaics_and_synth_layouts")  # fmt: skip
PLAIN_LAYOUTS = "synth_layouts_plain"
UNION_UNFILTERED = "mosaics_and_unfiltered_layouts"
# segmentor work dir -> (synthetic set, the demo row whose recipe it follows)
ROWS = {
    "val_mosaic": ("layouts_real", "real_mosaic"),
    "val_layouts": ("synth_layouts_filtered", "real_synth_layouts"),
    "val_layouts_unfiltered": ("synth_layouts", "real_synth_layouts"),
    "val_layouts_plain": (f"{PLAIN_LAYOUTS}_filtered", "real_synth_layouts"),
    "val_layouts_plain_unfiltered": (PLAIN_LAYOUTS, "real_synth_layouts"),
    "val_union": ("mosaics_and_synth_layouts", "real_mosaic_synth_layouts"),
    "val_union_unfiltered": (UNION_UNFILTERED, "real_mosaic_synth_layouts"),
}
DIFFERENCES = (
    ("new layouts unfiltered − filtered", "val_layouts_unfiltered", "val_layouts"),
    ("union unfiltered − filtered", "val_union_unfiltered", "val_union"),
    ("new layouts filtered − mosaics", "val_layouts", "val_mosaic"),
    ("new layouts unfiltered − mosaics", "val_layouts_unfiltered", "val_mosaic"),
    ("CRFM − plain, filtered", "val_layouts", "val_layouts_plain"),
    ("CRFM − plain, unfiltered", "val_layouts_unfiltered", "val_layouts_plain_unfiltered"),
)


def synthetic_sets(demo) -> None:
    """The plain layouts (filtered too) and the union with the unfiltered CRFM layouts."""
    from crfm.toy.demo.rows import LAYOUT_VECTORS, LAYOUTS, REAL_MOSAICS, SYNTH_LAYOUTS

    if not demo.path(PLAIN_LAYOUTS, "synthesis.json").is_file():
        job = demo.synthesis_job("index_.jsonl", PLAIN_LAYOUTS, None, root=LAYOUTS, vectors=LAYOUT_VECTORS)
        demo.run_together([job])
    if not demo.path(f"{PLAIN_LAYOUTS}_filtered", "index.jsonl").is_file():
        demo.run_together([demo.filter_job(PLAIN_LAYOUTS)])
    demo.union_dataset(UNION_UNFILTERED, [f"{REAL_MOSAICS}/index.jsonl", f"{SYNTH_LAYOUTS}/index.jsonl"])


def segmentors(demo) -> list[tuple[str, list[object]]]:
    """The rows above (their sets made first), each by its demo row's recipe, scored on the validation scenes."""
    import dataclasses

    from crfm.toy.demo.rows import ROWS as DEMO_ROWS

    synthetic_sets(demo)
    runs = []
    for work, (synthetic, recipe) in ROWS.items():
        row = dataclasses.replace(DEMO_ROWS[recipe], work=work, synthetic=synthetic)
        runs.append(demo.mixed_run(row, val="val.jsonl"))
    return runs


def main(argv: list[str] | None = None) -> int:
    from crfm.toy.demo.experiments import experiment_parser, paired, segmentor_metrics
    from crfm.utils.runs import mean_std

    args = experiment_parser(__doc__).parse_args(argv)
    metrics = segmentor_metrics(args, LINKED, segmentors)
    print("| validation mIoU (%) | " + " | ".join(run.name for run in args.runs) + " | mean ± std | road | building |")
    print("|---" * (len(args.runs) + 4) + "|")
    for work in ROWS:
        miou = [m["mIoU"] for m in metrics[work]]
        classes = [mean_std([m[f"IoU.{name}"] for m in metrics[work]]) for name in ("road", "building")]
        print(f"| {work} | " + " | ".join(f"{v:.2f}" for v in miou) + f" | {mean_std(miou)} | " + " | ".join(classes)
              + " |")  # fmt: skip
    print("\nPaired, by run:")
    for label, first, second in DIFFERENCES:
        print(f"- {label}: " + paired(*([m["mIoU"] for m in metrics[work]] for work in (first, second))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
