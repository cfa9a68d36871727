"""Which CRFM settings help the demo's generator? Chooses test.py's CRFM defaults on the *validation* masks of
finished demo runs (never the held-out ones), over several runs (seeds).

    python bench/crfm_settings.py --runs outputs/bench_demo/default/seed0 outputs/bench_demo/default/seed1 \
        outputs/bench_demo/default/seed2 --jobs 2 --table bench/results_crfm_settings_new.md

Each run is a finished demo: its fine-tuned generator, its guide (`seg_real`, drives CRFM) and its judge
(`seg_judge`, only grades). Every setting samples 2 images per validation mask with the demo's steps and mask
guidance, from the same noise (the run's seed), on one thread. The table: judge and guide mIoU, the judge's IoU of
roads and buildings, and seconds per image, mean ± std over runs, and the judge's paired difference to `plain` and
to test.py's current defaults. Resumable: finished rows are kept. `--setting NAME="flags"` adds rows; `--only NAME`
runs only the named rows (e.g. to compare generators).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

from crfm.sampling.rectify import CRFMConfig
from crfm.toy.toydata import CLASSES
from crfm.utils.runs import REPO, Job, mean_std, print_table, run_jobs_or_exit, run_logged

PER_MASK = 2
DEFAULT = "default"  # test.py's own CRFM defaults (no CRFM flag but the guide's)
REAL = "real"  # the real validation images' scores


def crfm_flags(rectified_step: int, max_step_size: float, num_rectified: int, views: int = 1, **more: object) -> str:
    """The test.py flags of an L2-normalised, unclamped setting (as the defaults are) with overrides; one view
    unless told (the rows before `--crfm_views` existed)."""
    return shlex.join(CRFMConfig(rectified_step=rectified_step, max_step_size=max_step_size,
                                 num_rectified=num_rectified, views=views, **more).flags())  # fmt: skip


# name -> test.py flags; None: no guide (plain sampling). Rows are for the demo's 10 Euler steps.
SETTINGS: dict[str, str | None] = {
    "plain": None,
    "paper": shlex.join(CRFMConfig.paper().flags()),
    DEFAULT: "",  # 8 views (chosen by this table); `views1` is the default before
    "views1": crfm_flags(12, 30.0, 3),
    "s30_r10_n1": crfm_flags(10, 30.0, 1),
    "s100_r10_n1": crfm_flags(10, 100.0, 1),
    "s10_r10_n3": crfm_flags(10, 10.0, 3),
    "s100_r10_n3": crfm_flags(10, 100.0, 3),
    "s30_r5_n3": crfm_flags(5, 30.0, 3),
    "s100_r5_n3": crfm_flags(5, 100.0, 3),
    "s300_r10_n1": crfm_flags(10, 300.0, 1),
    "s30_r3_n3": crfm_flags(3, 30.0, 3),
    "s30_r10_n3_constant": crfm_flags(10, 30.0, 3, step_scheme="C"),
    "views4": crfm_flags(12, 30.0, 3, views=4),
    "views8_s100": crfm_flags(12, 100.0, 3, views=8),
}


def row_dir(out: Path, name: str, run: Path) -> Path:
    return out / name / run.name


def sample_and_score(run: Path, name: str, flags: str | None, out: Path) -> None:
    """One (setting, run): the validation masks synthesized (timed), then scored by the judge and the guide."""
    settings = json.loads((run / "demo_settings.json").read_text())
    work = row_dir(out, name, run)
    timing = work / "seconds.json"
    if not timing.is_file():
        guide_dir = run / "seg_real"
        guide = [] if flags is None else [
            "--mmseg_config", str(guide_dir / "config.py"), "--mmseg_ckpt", str(guide_dir / "segmentor.pth"),
            *shlex.split(flags),
        ]  # fmt: skip
        start = time.perf_counter()
        run_logged([
            sys.executable, "-m", "crfm.sampling.synthesis", "--pretrained_model_name_or_path", str(run / "tiny_sd35"),
            "--data_root", str(run / "toydata"), "--json_file", "val_.jsonl", "--vectors_path", str(run / "vectors"),
            "--lora_ckpt", str(run / "train" / "final"), "--work_dir", str(work), "--num_cls", str(len(CLASSES)),
            "--resolution", str(settings["resolution"]), "--batch_size", "8", "--seed", str(settings["seed"]),
            "--num_per_mask", str(PER_MASK), "--num_inference_steps", str(settings["num_inference_steps"]),
            "--mask_guidance_scale", str(settings["mask_guidance_scale"]), "--no_progress", *guide,
        ], work.with_suffix(".log"))  # fmt: skip
        images = sum(1 for _ in (work / "index.jsonl").open())
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start, "images": images}) + "\n")
    score(run, work, "index.jsonl", work)


def score(run: Path, data_root: Path, index: str, work: Path) -> None:
    """The run's judge and guide on an index's images -> `work`/seg_judge.json, seg_real.json."""
    for segmentor in ("seg_judge", "seg_real"):
        scored = work / f"{segmentor}.json"
        if not scored.is_file():
            run_logged([
                sys.executable, "-m", "crfm.segmentation.evaluate", "--data_root", str(data_root), "--json_file",
                index, "--num_cls", str(len(CLASSES)), "--device", "cpu", "--no_progress",
                "--mmseg_config", str(run / segmentor / "config.py"),
                "--mmseg_ckpt", str(run / segmentor / "segmentor.pth"), "--out", str(scored),
            ], work.with_suffix(".log"))  # fmt: skip


def read_seconds(work: Path) -> dict[str, float]:
    timing = json.loads((work / "seconds.json").read_text())
    return {"s/image": timing["seconds"] / timing["images"]}


def read_scores(work: Path) -> dict[str, float]:
    judge = json.loads((work / "seg_judge.json").read_text())
    values = {"judge": 100 * judge["mIoU"], "guide": 100 * json.loads((work / "seg_real.json").read_text())["mIoU"]}
    thin = ("road", "building")
    values |= {f"judge {c}": 100 * iou for c, iou in zip(CLASSES, judge["IoU"], strict=True) if c in thin}
    return values


def table(results: dict[str, list[dict[str, float]]], settings: dict[str, str | None]) -> str:
    keys = ("judge", "guide", "judge road", "judge building", "s/image")
    lines = ["| setting | test.py flags (+ the guide) | " + " | ".join(keys) + " | judge − plain | judge − default |"]
    lines.append("|---|---|" + "---|" * (len(keys) + 2))
    for name, rows in results.items():
        flags = "(no guide)" if settings[name] is None else f"`{settings[name]}`" if settings[name] else "(defaults)"
        cells = [mean_std((r[k] for r in rows), digits=3 if k == "s/image" else 2) for k in keys]
        for other in ("plain", DEFAULT):
            paired = results.get(other)
            diffs = [r["judge"] - o["judge"] for r, o in zip(rows, paired, strict=True)] if paired else []
            cells.append(mean_std(diffs))
        lines.append(f"| `{name}` | {flags} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished demo runs")
    parser.add_argument("--setting", action="append", default=[], help='NAME="test.py flags": another row')
    parser.add_argument("--only", nargs="+", help="only these rows")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "crfm_settings")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once (each on one thread)")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    settings = {**SETTINGS, **dict(s.split("=", 1) for s in args.setting)}
    if args.only:
        unknown = set(args.only) - set(settings)
        if unknown:
            parser.error(f"--only: unknown rows {sorted(unknown)}; known: {list(settings)}")
        settings = {name: flags for name, flags in settings.items() if name in args.only}
    runs = [run.resolve() for run in args.runs]
    jobs = [
        Job(f"{name}/{run.name}", [], partial(sample_and_score, run, name, flags, args.out.resolve()))
        for name, flags in settings.items() for run in runs
    ]  # fmt: skip
    out = args.out.resolve()
    jobs += [Job(f"real/{run.name}", [], partial(score, run, run / "toydata", "val.jsonl", row_dir(out, REAL, run)))
             for run in runs]  # fmt: skip
    run_jobs_or_exit(jobs, args.jobs)
    real = [read_scores(row_dir(out, REAL, run)) for run in runs]
    results = {name: [read_scores(row_dir(out, name, run)) | read_seconds(row_dir(out, name, run)) for run in runs]
               for name in settings}  # fmt: skip
    judge, guide = (mean_std(r[key] for r in real) for key in ("judge", "guide"))
    text = f"Real validation images: judge {judge}, guide {guide}.\n\n"
    print_table(
        text + table(results, settings), args.table, "python bench/crfm_settings.py " + shlex.join(sys.argv[1:])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
