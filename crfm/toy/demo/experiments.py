"""Experiments on finished demo runs (bench/): a `Demo` standing on a run's folders, their shared command line, the
segmentor rows they train on each run, the real mosaics as the generator could at best draw them, and paired
differences run by run."""

from __future__ import annotations

import argparse
import json
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


def write_pairs(dataset, items, classes: Path, folder: Path) -> None:
    """A `PairDataset`-like `dataset` (images in [-1, 1], class-index labels) written as an index of PNG pairs with
    the `classes` file, the files named as `items`' images; the index last, so a set whose index exists is complete."""
    from crfm.data.index import CLASSES_FILE
    from crfm.sampling.sampler import to_uint8
    from crfm.sampling.synthesis import write_unit
    from crfm.utils.fileio import write_jsonl_atomic

    records = []
    for position, item in enumerate(items):
        sample = dataset[position]
        name = Path(item.target).stem
        write_unit(folder, name, to_uint8(sample["image"][None])[0], sample["label"].numpy())
        records.append({"source": f"label/{name}.png", "target": f"img/{name}.png", "prompt": item.prompt})
    (folder / CLASSES_FILE).write_bytes(classes.read_bytes())
    write_jsonl_atomic(folder / "index.jsonl", records)


def real_mosaic_sets(demo: Demo, resized: str = "mosaics_64", through_vae: str = "mosaics_vae") -> None:
    """The run's real mosaics (made from the labelled pairs only) at the generator's resolution, as its data loader
    resizes image and mask (`resized`), and those through its VAE (`through_vae`): real images as the generator could
    at best draw them. A set whose index exists is kept."""
    from crfm.data.dataset import PairDataset
    from crfm.data.index import CLASSES_FILE, read_index
    from crfm.toy.demo.rows import REAL_MOSAICS
    from crfm.toy.demo.settings import NUM_CLS
    from crfm.toy.demo.stages import VAEReconstructions

    items = read_index(demo.path(REAL_MOSAICS, "index.jsonl"))
    at_resolution = PairDataset(items, demo.path(REAL_MOSAICS), resolution=demo.s.resolution, num_cls=NUM_CLS)
    vae = demo.path("tiny_sd35", "vae")
    sets = ((resized, lambda: at_resolution), (through_vae, lambda: VAEReconstructions(at_resolution, vae)))
    for work, dataset in sets:
        if not demo.path(work, "index.jsonl").is_file():
            write_pairs(dataset(), items, demo.path(REAL_MOSAICS, CLASSES_FILE), demo.path(work))


def paired(first: list[float], second: list[float]) -> str:
    """first − second, run by run: mean ± std (each run's difference)."""
    from crfm.utils.runs import mean_std

    steps = [a - b for a, b in zip(first, second, strict=True)]
    return f"{mean_std(steps)} ({' / '.join(f'{v:+.2f}' for v in steps)})"
