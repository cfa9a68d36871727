"""What the demo's tables hold: the image sets scored for mask fidelity and the downstream rows, one table each.

A downstream row is one segmentor: its key in summary.json, its work dir, its name in summary.md and the synthetic
set added to the labelled scenes (None: real data only). Rows of real data alone train beside the generator (the
models stage); the others need synthetic pairs and train in the downstream stage. Rows that are neither the paper's
chain nor a baseline it must beat run only with their knob (`--preset full`, the 3-seed bench), which keeps the
default demo inside its 15 minutes: the ablation rows with `ablations` (unfiltered, plain, hardness-resampled, new
layouts alone), the extra-real upper bound with `upper_bound`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Held-out syntheses: image set -> (work dir, CRFM setting for `Demo.synthesize`). With "real", the rows of the
# mask-fidelity table; in this order also the figure's middle columns.
SYNTHESES = {
    "plain": ("synth_plain", None),
    "crfm_paper": ("synth_crfm_paper", "paper"),
    "crfm": ("synth_crfm", "default"),
}
# "vae": the real held-out images passed through the VAE, the ceiling of what any generator can score.
IMAGE_SETS = ("real", "vae", *SYNTHESES)
FEW_STEP = ("fewstep", "synth_fewstep")  # (image set, work dir) of the few-step student's held-out synthesis
FIGURE_TITLES = ("mask", "plain", "CRFM paper", "CRFM default", "real")

REAL_MOSAICS = "layouts_real"  # the labelled pairs cut into the new layouts' mosaics (the data stage)
LAYOUTS, LAYOUT_VECTORS = "layouts", "vectors_layouts"  # the same mosaics' masks for the generator, their vectors
SYNTH_LAYOUTS = "synth_layouts"  # the generator's images of them (CRFM), one per layout
# Unions: (work dir, index files of the parts, relative to the demo folder).
# The real mosaics and the filtered synthetic layouts: what a user with both would train on.
MOSAICS_AND_SYNTH = (
    "mosaics_and_synth_layouts",
    (f"{REAL_MOSAICS}/index.jsonl", f"{SYNTH_LAYOUTS}_filtered/index.jsonl"),
)
# The generator's data with `generator_mosaics`: the labelled pairs and their real mosaics (more layouts to learn
# mask-following from; no new image).
GENERATOR_DATA = ("generator_data", ("toydata/train.jsonl", f"{REAL_MOSAICS}/index.jsonl"))
GENERATOR_VECTORS = f"vectors_{GENERATOR_DATA[0]}"  # their prompt vectors


@dataclass(frozen=True)
class DownstreamRow:
    key: str  # summary.json's key
    work: str  # the segmentor's work dir
    name: str  # summary.md's row name
    synthetic: str | None  # the set added to the labelled scenes, `synth_ratio` of the draws; None: real data only
    knob: str | None = None  # the `DemoSettings` knob the row needs on (None: always trained)
    parts: int = 1  # equal-sized sets in `synthetic` (a union), each to be drawn as often as a one-set row's set

    def synthetic_share(self, synth_ratio: float) -> float:
        """The share of synthetic draws at which each of the row's `parts` is drawn, per labelled draw, as often as
        a one-set row at `synth_ratio` draws its set: a union adds its parts to each other instead of splitting one
        set's draws between them (at 0.5 and two parts, 2/3: labelled, first and second part 1 : 1 : 1)."""
        per_labelled_draw = self.parts * synth_ratio / (1 - synth_ratio)
        return per_labelled_draw / (1 + per_labelled_draw)


DOWNSTREAM = (
    DownstreamRow("real_only", "seg_real", "real only (the labelled scenes)", None),
    # Unfiltered: ablations of the paper's recipe (which filters); CRFM and plain are compared after filtering.
    DownstreamRow(
        "real_synth_plain", "seg_real_synth_plain", "real + plain synthetic", "synth_train_plain", knob="ablations"
    ),
    DownstreamRow("real_synth", "seg_real_synth", "real + CRFM synthetic", "synth_train", knob="ablations"),
    DownstreamRow(
        "real_synth_plain_filtered",
        "seg_real_synth_plain_filtered",
        "real + plain synthetic, filtered",
        "synth_train_plain_filtered",
        knob="ablations",  # CRFM against plain; the mask-fidelity table compares them in every run
    ),
    DownstreamRow(
        "real_synth_filtered", "seg_real_synth_filtered", "real + CRFM synthetic, filtered", "synth_train_filtered"
    ),
    DownstreamRow(
        "real_synth_filtered_resampled",
        "seg_real_synth_filtered_resampled",
        "real + CRFM synthetic, hardness-resampled and filtered",
        "synth_train_resampled_filtered",
        knob="ablations",
    ),
    DownstreamRow(
        "real_synth_layouts",
        "seg_real_synth_layouts",
        "real + CRFM synthetic of new layouts (mosaics of the labelled masks), filtered",
        f"{SYNTH_LAYOUTS}_filtered",
        knob="ablations",  # the generator against copy-paste; the default trains what a user would, both together
    ),
    DownstreamRow(
        "real_mosaic",
        "seg_real_mosaic",
        "real + the same mosaics cut from the real pairs (no generator: the control)",
        REAL_MOSAICS,
    ),
    DownstreamRow(
        "real_mosaic_synth_layouts",
        "seg_real_mosaic_synth_layouts",
        "real + real mosaics + CRFM new layouts, filtered (synthesis on top of copy-paste)",
        MOSAICS_AND_SYNTH[0],
        # The mosaics drawn as often as in `real_mosaic`, the synthetic layouts on top (bench/results_layouts.md).
        parts=len(MOSAICS_AND_SYNTH[1]),
    ),
    DownstreamRow(
        "real_extra", "seg_real_extra", "real + as many extra real scenes (upper bound)", None, knob="upper_bound"
    ),
)
ROWS = {row.key: row for row in DOWNSTREAM}
# Synthetic sets of real data only: their rows train beside the generator.
REAL_DATA_SETS = (None, REAL_MOSAICS)
# Train on synthetic, test on real (an ablation): the CRFM pairs of the labelled masks alone, the real-only recipe.
TSTR = "seg_tstr"


def downstream_rows(settings: object) -> tuple[DownstreamRow, ...]:
    """The rows a run with these `DemoSettings` trains: the paper's chain and its baselines, and the rows whose knob
    is on."""
    return tuple(row for row in DOWNSTREAM if row.knob is None or getattr(settings, row.knob))
