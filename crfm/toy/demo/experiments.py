"""Experiments on finished demo runs (bench/): a `Demo` standing on a run's folders, their shared command line, the
segmentor rows they train on each run, and the tables' mean ± std."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from crfm.toy.demo.settings import SETTINGS_FILE, DemoSettings, recorded_knobs
from crfm.toy.demo.stages import Demo

SegmentorRuns = list[tuple[str, list[object]]]  # (work dir, flags), as `Demo.train_segmentors` takes them


def linked_demo(run: Path, out: Path, parts: Iterable[str], **knobs: object) -> Demo:
    """A `Demo` on `out` with a finished run's recorded settings (and `knobs` changed), whose `parts` are links to
    the run's folders: an experiment that writes only its own new parts and leaves the run as it is."""
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if not (out / part).exists():
            (out / part).symlink_to(run.resolve() / part)
    settings = DemoSettings(**(recorded_knobs(json.loads((run / SETTINGS_FILE).read_text())) | knobs))
    return Demo(out.resolve(), settings, progress=False)


def experiment_parser(description: str) -> argparse.ArgumentParser:
    """The command line every experiment shares: the finished runs, the output folder, the lanes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished demo runs (the default preset suffices)")
    parser.add_argument("--out", type=Path, required=True, help="one folder per run inside, named as the run's")
    parser.add_argument("--lanes", type=int, default=2, help="segmentors trained side by side")
    return parser


def segmentor_metrics(
    args: argparse.Namespace, parts: Iterable[str], segmentors: Callable[[Demo], SegmentorRuns]
) -> dict[str, list[dict]]:
    """On each run (`linked_demo` on `parts`, into `--out/<run name>`): `segmentors(demo)` makes what its rows need and
    names them, they train (a row whose metrics.json exists is kept); work dir -> metrics.json per run."""
    metrics: dict[str, list[dict]] = {}
    for run in args.runs:
        demo = linked_demo(run, args.out / run.name, parts)
        runs = segmentors(demo)
        demo.train_segmentors(runs, lanes=args.lanes)
        for work, _ in runs:
            metrics.setdefault(work, []).append(json.loads(demo.path(work, "metrics.json").read_text()))
    return metrics


def spread(values: list[float]) -> str:
    """mean ± sample std (the tables' format); one value: empty."""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""


def paired(first: list[float], second: list[float]) -> str:
    """first − second, run by run: mean ± std (each run's difference)."""
    steps = [a - b for a, b in zip(first, second, strict=True)]
    return f"{spread(steps)} ({' / '.join(f'{v:+.2f}' for v in steps)})"
