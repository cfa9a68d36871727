"""bench/filter_margin.py: its `ref_vae` variant's filter reads the reference set, not the labelled scenes."""

from __future__ import annotations

from pathlib import Path

from crfm.segmentation.filter import build_parser
from crfm.toy.demo.settings import DemoSettings
from crfm.toy.demo.stages import Demo
from tests.helpers import load_script


def test_reference_flags_replace_the_real_set_only(tmp_path):
    bench = load_script("bench/filter_margin.py")
    demo = Demo(tmp_path, DemoSettings(), progress=False)
    _, _, flags = demo.filter_job("synth_layouts")
    reference = tmp_path / "mosaics_vae"
    args = build_parser().parse_args([str(flag) for flag in bench.on_reference(flags, reference)])
    assert (Path(args.data_root), args.json_file) == (reference, "index.jsonl")
    # The rest is the demo's own filter.
    demos = build_parser().parse_args([str(flag) for flag in flags])
    assert (Path(demos.data_root), demos.json_file) == (tmp_path / "toydata", "train.jsonl")
    assert {k: v for k, v in vars(args).items() if k not in ("data_root", "json_file")} == {
        k: v for k, v in vars(demos).items() if k not in ("data_root", "json_file")
    }
