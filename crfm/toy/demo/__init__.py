"""The whole TODSynth pipeline on the embedded default, offline, on a CPU: README's first command.

    python -m crfm.toy.demo [--out outputs/demo] [--preset default|full|ci] [--fresh] [--KNOB VALUE ...]

Stages (each prints the command it runs, so every step can be repeated by hand at real scale), in the paper's
low-label regime: a generator pretrained on a large unlabelled corpus is fine-tuned with masks on a few scenes.
Independent commands of a stage (vectors, syntheses, filters, segmentors) run side by side, one thread each.
 1. toy remote-sensing scenes: a held-out split (only for the tables), a validation split (for choices, in
    `bench/`), a small labelled split, as many further real scenes as synthetic ones (the `real_extra` upper
    bound), separate scenes for the judge (another seed), and 2 x 2 mosaics of the labelled masks (`crfm.data.layouts`,
    the new layouts): cut from the labelled pairs too (`--with_images`, the `real_mosaic` control) and as masks only;
 2. the base: a copy of the shipped pretrained tiny SD3.5 (`crfm/toy/tiny_sd35_base`) or of `--base FOLDER`, or
    `--base scratch`;
 3. prompt vectors of the scenes and the new layouts (`crfm.data.vectorize`, i.e. `preprocess/vectorize.py`);
 4. the models, side by side, one core each: the mask-conditioned MM-DiT fine-tuned on the labelled split
    (`crfm.training.train`, i.e. `train.py`), stage (a); beside it, one after another, the segmentors that need no
    synthetic data (`crfm.segmentation.downstream`, i.e. `scripts/train_segmentor.py`; mmseg): the frozen CRFM
    guide, which is also the real-only downstream segmentor and filters and ranks (`--seg_config`), on the
    labelled split only; the judge (`--judge_config`, a full-resolution U-Net) on its own scenes, which scores mask
    fidelity and never guides; and the downstream rows of real data alone (real mosaics, and with
    `--upper_bound` extra real scenes);
    the guide last, and the generator's core takes what still waits when the generator ends first;
 5. synthesis of the held-out masks from the same noise (`crfm.sampling.synthesis`, i.e. `test.py`), stage (b):
    plain, CRFM at the paper's settings, and CRFM at test.py's defaults;
 6. mask fidelity of the real held-out images, of the same images through the VAE (the ceiling), and of the
    three syntheses;
 7. synthesis of the training pairs with CRFM: the *labelled* masks x`num_per_mask` (held-out masks would leak
    held-out labels into training) and the new layouts' masks (with `--ablations` also plain, and CRFM with more
    images for harder masks, `crfm.segmentation.hardness`);
 8. FreeMask-style filtering of every synthetic set (`crfm.segmentation.filter`): noisy synthetic pixels -> ignore;
    then the real mosaics and the filtered new layouts as one dataset;
 9. downstream, stage (c): segmentors on real + filtered CRFM pairs and on real + real mosaics + filtered CRFM new
    layouts (with `--ablations` also plain, unfiltered, hardness-resampled, new layouts alone, and the synthetic
    pairs alone), all scored on the held-out real scenes
    like the real-data rows of stage 4; mixed runs see each real image as often as the real-only run
    (`--match_real_exposure`), and the union each real mosaic as often as the mosaic row (`DownstreamRow.parts`);
10. few-step (docs/fewstep.md): reflow pairs of the labelled masks from the CRFM-guided generator
    (`crfm.reflow`), a k-SeqRF (or 2-RF) student trained on them (`train.py --reflow_pairs`), and the held-out masks
    drawn by the student in `--few_step` Euler steps with no segmentor, scored like the other syntheses;
11. report: `summary.json`, `summary.md`, `samples.png` (mask | plain | CRFM paper | CRFM default | few-step |
    real at the generator's resolution | real at the scenes').

Every tool runs as `python -m <module>` of the installed (or checked-out) package, so no checkout is needed.
The parts: `settings` (knobs, presets, checks), `rows` (the image sets and downstream rows), `runner` (commands and
stage markers), `stages` (what each stage runs, the stage table) and `report` (tables and figure).
A re-run reuses every finished stage; an interrupted stage resumes (training from its last checkpoint,
synthesis from its last written image, segmentors from mmengine's checkpoint; a segmentor that wrote its
metrics is kept). `--fresh` starts over.
Changing a knob against an existing --out is refused (use --fresh or another --out), so results never mix
settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from crfm.toy.demo.report import figure_titles, write_report
from crfm.toy.demo.rows import DOWNSTREAM, ROWS, DownstreamRow
from crfm.toy.demo.settings import (
    DEFAULT_OUT,
    KNOB_HELP,
    PRESETS,
    DemoSettings,
    check_knobs,
    check_settings,
    scene_splits,
)
from crfm.toy.demo.stages import STAGES, Demo, Stage
from crfm.utils.flags import add_run_flags, entry_point

__all__ = [
    "DOWNSTREAM",
    "PRESETS",
    "ROWS",
    "STAGES",
    "DemoSettings",
    "DownstreamRow",
    "Stage",
    "build_parser",
    "main",
    "scene_splits",
    "settings_from_args",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crfm.toy.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="full: also the ablation rows and the upper bound (the 3-seed bench); ci: a few-minute smoke run",
    )
    parser.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    parser.add_argument("--until", choices=[stage.name for stage in STAGES], help="stop after this stage (no report)")
    knobs = parser.add_argument_group("knobs (override the preset)")
    for field in dataclasses.fields(DemoSettings):
        help_text = f"{KNOB_HELP[field.name]} (default {field.default})"
        if isinstance(field.default, bool):  # --name / --no-name; None: not given, the preset decides
            knobs.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            knobs.add_argument(f"--{field.name}", type=type(field.default), default=None, help=help_text)
    add_run_flags(parser, seed_help=None)  # --no_progress; the seed is a knob
    return parser


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The preset's settings, with the knobs given on the command line; impossible combinations refused."""
    values = {**PRESETS[args.preset]}
    values.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings) if getattr(args, f.name) is not None}
    )
    settings = DemoSettings(**values)
    check_knobs(settings)
    return settings


def run_demo(args: argparse.Namespace) -> int:
    """Every stage not done yet, then the report; 0, or 1 when a stage's command failed."""
    settings = settings_from_args(args)
    out = args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    check_settings(out, settings)

    demo = Demo(out, settings, progress=not args.no_progress)
    start = time.perf_counter()
    for number, stage in enumerate(STAGES, 1):
        name = stage.name
        results = partial(stage.results, demo) if stage.results else None
        try:
            demo.stage(number, len(STAGES), name, stage.title, partial(stage.action, demo), results)
        except subprocess.CalledProcessError as exc:
            print(
                f"\nerror: stage '{name}' failed (exit {exc.returncode}) in the command above. Fix the cause and run "
                "the same command again: finished stages are reused and this one resumes.",
                file=sys.stderr,
            )
            return 1
        if name == args.until:
            return 0
    print(f"\n=== report -> {out} ===")
    summary = write_report(demo)
    print(summary["markdown"])
    print(f"figure  : {out / 'samples.png'} ({' | '.join(figure_titles(settings))})")
    print(f"tables  : {out / 'summary.md'}, {out / 'summary.json'}")
    print(f"this run: {time.perf_counter() - start:.0f} s")
    return 0


main = entry_point(build_parser, run_demo)
