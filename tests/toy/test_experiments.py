"""crfm.toy.demo.experiments: what bench/ experiments on finished demo runs stand on."""

from __future__ import annotations

import json

import torch

from crfm.data.dataset import PairDataset
from crfm.data.index import CLASSES_FILE, read_index
from crfm.toy.demo.experiments import linked_demo, paired, write_pairs
from crfm.toy.demo.settings import SETTINGS_FILE
from crfm.toy.toydata import write_dataset


def test_linked_demo_stands_on_the_run_and_keeps_its_settings(tmp_path):
    run = tmp_path / "run"
    (run / "toydata").mkdir(parents=True)
    (run / "toydata" / "index.jsonl").write_text("{}\n")
    (run / SETTINGS_FILE).write_text(json.dumps({"seed": 7, "train_steps": 5}))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))

    demo = linked_demo(run, tmp_path / "experiment", ["toydata"])
    assert (demo.s.seed, demo.s.train_steps) == (7, 5)  # the run's knobs, not the defaults
    link = tmp_path / "experiment" / "toydata"
    assert link.is_symlink() and link.resolve() == (run / "toydata").resolve()
    assert demo.path("toydata", "index.jsonl").read_text() == "{}\n"
    linked_demo(run, tmp_path / "experiment", ["toydata"])  # again: the link is kept, not refused
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the run is left as it was
    assert sorted(p.name for p in (tmp_path / "experiment").iterdir()) == ["toydata"]
    changed = linked_demo(run, tmp_path / "variant", ["toydata"], tolerance_margin=2.0)  # bench/filter_margin.py
    assert (changed.s.tolerance_margin, changed.s.seed, changed.s.train_steps) == (2.0, 7, 5)


def test_paired_differences_are_run_by_run():
    # Paired, the runs' common offset cancels: the spread is that of the differences, not of either row.
    assert paired([50.0, 60.0, 70.0], [49.0, 58.0, 70.0]) == "1.00 ± 1.00 (+1.00 / +2.00 / +0.00)"


def test_segmentor_metrics_collects_each_runs_rows(tmp_path):
    """Rows whose metrics.json exists are kept (nothing trains); each run's rows come back in the runs' order."""
    import argparse

    from crfm.toy.demo.experiments import segmentor_metrics

    runs = []
    for seed in (3, 4):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / SETTINGS_FILE).write_text(json.dumps({"seed": seed}))
        runs.append(run)

    def finished_rows(demo):
        for work in ("a", "b"):
            demo.path(work).mkdir(exist_ok=True)
            score = demo.s.seed * 10 + len(work)
            demo.path(work, "metrics.json").write_text(json.dumps({"mIoU": score, "work": work}))
        return [("a", []), ("b", [])]

    args = argparse.Namespace(runs=runs, out=tmp_path / "out", lanes=1)
    metrics = segmentor_metrics(args, [], finished_rows)
    assert [m["mIoU"] for m in metrics["a"]] == [31, 41] and [m["work"] for m in metrics["b"]] == ["b", "b"]
    assert (tmp_path / "out" / "seed4" / "b" / "metrics.json").is_file()  # each run in its own folder


def test_written_pairs_read_back_as_the_resized_set(tmp_path):
    index = write_dataset(tmp_path / "real", 3, 128, seed=5, progress=False)
    items = read_index(index)
    resized = PairDataset(items, tmp_path / "real", resolution=64, num_cls=6)
    out = tmp_path / "written"
    write_pairs(resized, items, tmp_path / "real" / CLASSES_FILE, out)

    written = PairDataset(read_index(out / "index.jsonl"), out, num_cls=6)  # no resizing on the way back
    assert len(written) == len(resized)
    for position in range(len(resized)):
        before, after = resized[position], written[position]
        assert after["image"].shape == (3, 64, 64) and after["prompt"] == before["prompt"]
        assert torch.equal(after["label"], before["label"])  # ignore pixels (255) included
        assert (after["image"] - before["image"]).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding only
    assert (out / CLASSES_FILE).read_bytes() == (tmp_path / "real" / CLASSES_FILE).read_bytes()
