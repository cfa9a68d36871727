"""Label-scaling curve: real-only downstream mIoU against the number of labelled scenes, on fixed held-out scenes.

    python bench/label_curve.py --seeds 0 1 2 --sizes 8 16 48 160 480 [--out outputs/bench_label_curve] \
        [--table bench/results_label_curve.md] [--KNOB VALUE ...]

This chooses where the demo sits: a regime where labels are the bottleneck, i.e. where ten times more real labelled
scenes would still gain several mIoU. For each seed the toy scenes are drawn exactly as the demo draws them
(`crfm.toy.demo.scene_splits`): held-out scenes first, then validation, then labelled scenes in order, so the
first N labelled scenes of the curve are the demo's N labelled scenes and every N is scored on the demo's held-out
scenes. Each point is the demo's downstream segmentor recipe (`--seg_config`, `--seg_iters`, `--seg_size`; the
demo's defaults) on real scenes only. Every run is one `python -m crfm.segmentation.downstream` call; finished runs
are reused (the job is resumable: run it under nohup and re-run after an interruption).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from crfm.toy.demo import DemoSettings, scene_splits
from crfm.toy.toydata import CLASSES, write_dataset
from crfm.utils.runs import mean_std, run_logged

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, seed: int, largest: int, settings: DemoSettings) -> None:
    """The demo's scenes for `seed` with `largest` labelled ones: test.jsonl, and train_<N>.jsonl per size later."""
    total = settings.test_scenes + settings.val_scenes + largest
    if not (root / "index.jsonl").is_file() or len((root / "index.jsonl").read_text().splitlines()) != total:
        write_dataset(root, total, settings.scene_size, seed=seed, workers=1, progress=False)
    lines = (root / "index.jsonl").read_text().splitlines(keepends=True)
    splits = scene_splits(len(lines), settings.test_scenes, settings.val_scenes)
    (root / "test.jsonl").write_text("".join(lines[i] for i in splits["test"]))
    (root / "labelled.jsonl").write_text("".join(lines[i] for i in splits["train"]))


def run_point(root: Path, out: Path, n: int, seed: int, settings: DemoSettings) -> dict:
    metrics = out / "metrics.json"
    if not metrics.is_file():
        labelled = (root / "labelled.jsonl").read_text().splitlines(keepends=True)
        (root / f"train_{n}.jsonl").write_text("".join(labelled[:n]))
        config = settings.config_path(settings.seg_config)
        cmd = [
            sys.executable, "-m", "crfm.segmentation.downstream", "--mmseg_config", config,
            "--data_root", str(root), "--json_file", f"train_{n}.jsonl", "--val_file", "test.jsonl",
            "--work_dir", str(out), "--num_cls", str(len(CLASSES)), "--max_iters", str(settings.seg_iters),
            "--img_size", str(settings.seg_size), "--seed", str(seed), "--device", "cpu",
        ]  # fmt: skip
        run_logged(cmd, threads=None)
    return json.loads(metrics.read_text())


def table(results: dict[int, dict[int, dict]], command: str, settings: DemoSettings) -> str:
    sizes = sorted(results)
    seeds = sorted({s for by_seed in results.values() for s in by_seed})
    lines = [
        "# Label-scaling curve: real-only downstream segmentor",
        "",
        f"`{command}`",
        "",
        f"Segmentor: `{settings.seg_config}`, {settings.seg_iters} iterations, batch 8, "
        f"{settings.seg_size} px; scored on the demo's {settings.test_scenes} held-out scenes of each seed. "
        "mIoU in %, mean ± sample std over seeds.",
        "",
        "| labelled scenes | seeds | mIoU | gain of 10x labels |",
        "|---|---|---|---|",
    ]
    for n in sizes:
        values = [results[n][s]["mIoU"] for s in sorted(results[n])]
        ten = 10 * n
        # Paired over seeds where the curve has the point 10 N (or the nearest larger one measured).
        larger = [m for m in sizes if m >= ten]
        gain = "–"
        if larger:
            m = larger[0]
            diffs = [
                results[m][s]["mIoU"] - results[n][s]["mIoU"] for s in seeds if s in results[m] and s in results[n]
            ]
            gain = f"{mean_std(diffs)} (vs {m})"
        lines.append(f"| {n} | {len(values)} | {mean_std(values)} | {gain} |")
    lines += ["", "Per seed:", "", "| labelled scenes | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for n in sizes:
        cells = [f"{results[n][s]['mIoU']:.2f}" if s in results[n] else "–" for s in seeds]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 48, 160, 480])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_label_curve")
    parser.add_argument("--table", type=Path, default=REPO / "bench" / "results_label_curve.md")
    args, knobs = parser.parse_known_args()
    overrides = {}
    for flag, value in zip(knobs[::2], knobs[1::2], strict=True):
        name = flag.removeprefix("--")
        overrides[name] = type(getattr(DemoSettings(), name))(value)
    settings = DemoSettings(**overrides)
    results: dict[int, dict[int, dict]] = {n: {} for n in args.sizes}
    for seed in args.seeds:
        root = args.out / f"seed{seed}" / "toydata"
        prepare(root, seed, max(args.sizes), settings)
        for n in args.sizes:
            results[n][seed] = run_point(root, args.out / f"seed{seed}" / f"real{n}", n, seed, settings)
            print(f"seed {seed}, {n} labelled scenes: mIoU {results[n][seed]['mIoU']:.2f}", flush=True)
    command = shlex.join(["python", "bench/label_curve.py", *sys.argv[1:]])
    text = table(results, command, settings)
    args.table.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
