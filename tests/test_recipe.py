"""The real-scale recipe, run as written (issue #29): `scripts/recipe.sh`, whose blocks docs/recipe.md quotes and whose
command README gives, on the LoveDA pairs of ../shared/rs_samples in LoveDA's own label ids, with the shipped tiny
base in place of SD3.5, CPU flags and tiny step counts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, subprocess_env

RECIPE = REPO / "scripts" / "recipe.sh"
RECIPE_DOC = REPO / "docs" / "recipe.md"
BASE = REPO / "crfm" / "toy" / "tiny_sd35_base"
LOVEDA = json.loads((REPO / "crfm" / "data" / "classes" / "loveda.json").read_text())
# Steps before the script: set-up (CI has run it) and the weights (internet; the shipped base stands in).
BEFORE_THE_SCRIPT = ("bash scripts/setup.sh", "hf download stabilityai/stable-diffusion-3.5-medium")
NOISE = (
    "worker processes",  # a DataLoader with more workers than cores
    "The draw is False",  # mmseg's visualization hook that draws nothing
    "build_loss",  # mmseg deprecations
    "reduce_zero_label",
    "FileClient",
    "nan s/image",  # a synthesis run with nothing left to do
    "HardDiskBackend",  # mmengine notices its own hooks and metrics trigger
    "The prefix is not set",
)


def script_blocks() -> dict[str, str]:
    """The script's knobs block and its numbered steps ('2' ... '8'), as the docs must quote them."""
    blocks = {}
    for block in RECIPE.read_text(encoding="utf-8").split("\n\n"):
        block = block.strip("\n")
        first = block.splitlines()[0]
        step = re.match(r"# (\d)\. ", first)
        if first.startswith("# knobs") or step:
            blocks[step.group(1) if step else "knobs"] = block
    return blocks


def test_docs_quote_the_script_and_readme_runs_it():
    blocks = script_blocks()
    assert sorted(blocks) == ["2", "3", "4", "5", "6", "7", "8", "knobs"]
    doc = RECIPE_DOC.read_text(encoding="utf-8")
    for name, block in blocks.items():
        assert f"```bash\n{block}\n```" in doc, f"docs/recipe.md does not quote recipe.sh's block {name} as it is"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Real-scale recipe") :]
    code = re.search(r"```bash\n(.*?)\n```", section, flags=re.DOTALL).group(1)
    commands = [line for line in code.splitlines() if line and not line.startswith("#")]
    assert [c for c in commands if not c.startswith(BEFORE_THE_SCRIPT)] == [
        "BASE=sd3.5_medium DATA=data/loveda WORK=work_dirs bash scripts/recipe.sh"
    ]
    knobs = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", blocks["knobs"], flags=re.MULTILINE))
    assert (knobs["BASE"], knobs["DATA"], knobs["WORK"]) == ("sd3.5_medium", "data/loveda", "work_dirs")


def loveda_in_its_own_ids(rs_samples: Path, root: Path) -> Path:
    """The sample LoveDA pairs as LoveDA ships them: labels hold original values (class id + 1, see the samples'
    README), with a no-data strip (0) along one edge of the first tile."""
    data = root / "loveda"
    (data / "img").mkdir(parents=True)
    (data / "label").mkdir()
    for index, label_path in enumerate(sorted((rs_samples / "loveda" / "label").glob("*.png"))):
        shutil.copy(rs_samples / "loveda" / "img" / label_path.name, data / "img" / label_path.name)
        label = np.array(Image.open(label_path))
        original = np.where(label == 255, 0, label + 1).astype(np.uint8)
        if index == 0:
            original[:, :16] = 0
        Image.fromarray(original).save(data / "label" / label_path.name)
    return data


def base_resolution() -> int:
    """The largest image the shipped base's position grid covers: VAE factor x patch x grid side."""
    transformer = json.loads((BASE / "transformer" / "config.json").read_text())
    vae = json.loads((BASE / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return factor * transformer["patch_size"] * transformer["pos_embed_max_size"]


def test_the_recipe_runs_as_written(rs_samples, tmp_path):
    data = loveda_in_its_own_ids(rs_samples, tmp_path / "data")
    work = tmp_path / "work"
    knobs = {
        "BASE": str(BASE),
        "DATA": str(data),
        "WORK": str(work),
        "DEVICE": "cpu",
        "PRECISION": "no",
        "ACCELERATE_CONFIG": "configs/accelerate_cpu.yaml",
        "RESOLUTION": str(base_resolution()),
        "TRAIN_STEPS": "4",
        "CHECKPOINTING_STEPS": "2",
        # The LoveDA SegFormer-B2 runs too (tests/segmentation/test_downstream.py); at 64 px on a CPU the toy
        # SegFormer guides CRFM three times faster.
        "SEG_CONFIG": "crfm/segmentation/configs/toy_segformer.py",
        "SEG_ITERS": "10",
        "SEG_BATCH": "2",
        "SEG_FLAGS": "--img_size 64",
        "NUM_PER_MASK": "1",
        "SYNTH_BATCH": "4",
    }
    start = time.perf_counter()
    # From another directory: the script runs in the repository root whatever the caller's.
    proc = subprocess.run(
        ["bash", str(RECIPE)], cwd=tmp_path, env=subprocess_env(**knobs), capture_output=True, text=True, timeout=600
    )
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    print(f"recipe: {seconds:.0f} s, {len(log.splitlines())} log lines")

    # 2: the shipped class names and the LoveDA remap; the histogram of what was written.
    assert json.loads((data / "classes.json").read_text())["classes"] == LOVEDA["classes"]
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(train) == 7 and all(item["source"].startswith("label_remapped/") for item in train)
    assert any("agriculture" in item["prompt"] for item in train)
    assert "| 6 agriculture |" in proc.stdout and "| 255 ignore | 8192 |" in proc.stdout  # the no-data strip
    # The precision that ran is said: MM-DiT training, sampling, segmentors.
    assert "mixed precision no" in proc.stdout and "CRFM on; torch.float32 on cpu" in proc.stdout
    assert "iterations, fp32" in proc.stdout
    # 5-7: every row in its own folder, each with its record; the LoveDA config reports IoU per class.
    rows = {name: work / name for name in ("seg_real", "seg_judge", "seg_real_synth", "seg_real_synth_filtered")}
    metrics = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in rows.items()}
    assert all(f"IoU.{name}" in m for m in metrics.values() for name in LOVEDA["classes"])
    assert metrics["seg_real"]["synthetic_train"] == 0 and metrics["seg_real_synth"]["synthetic_train"] == 7
    records = {name: json.loads((folder / "downstream_settings.json").read_text()) for name, folder in rows.items()}
    assert records["seg_real_synth"]["synth_root"] == str(work / "synth_loveda")
    assert records["seg_real_synth_filtered"]["synth_root"] == str(work / "synth_loveda_filtered")
    # Console: progress lines, no start-up dumps (the run's log file has them), no alarming noise.
    assert "Config:" not in proc.stdout and "paramwise_options" not in proc.stdout
    assert "Iter(train)" in proc.stdout and "eta:" in proc.stdout
    assert any("Config:" in p.read_text() for p in (work / "seg_real").glob("*/*.log"))
    assert not [noise for noise in NOISE if noise in log], log[-6000:]
    # 6: both synthetic sets; fidelity by the judge and, labelled inflated, by the guide.
    for folder in ("synth_loveda", "synth_loveda_paper"):
        assert len(list((work / folder / "img").iterdir())) == 7
    judge = json.loads((work / "synth_loveda" / "mask_fidelity_judge.json").read_text())
    guide = json.loads((work / "synth_loveda" / "mask_fidelity_guide.json").read_text())
    assert (judge["scorer"]["role"], guide["scorer"]["role"]) == ("judge", "guide")
    assert "inflated" in proc.stdout
    # 8: the report: contact sheet, a table per class with the change against real only.
    report = (work / "report" / "report.md").read_text()
    assert (work / "report" / "contact_sheet.png").is_file()
    assert "| IoU agriculture |" in report and "real + CRFM, filtered − real only" in report

    # A row's folder reused with another synthetic set: refused in one line naming the change, nothing rewritten.
    config = (work / "seg_real_synth" / "config.py").read_text()
    again = subprocess.run(
        ["bash", "downstream.sh", "--real_repeat", "10", "--match_real_exposure", "--max_iters", "10", "--batch_size",
         "2", "--device", "cpu", "--img_size", "64", "--no_progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=subprocess_env(DATA_ROOT=str(data), SYNTH_ROOT=str(work / "synth_loveda_filtered"), NUM_CLS="7",
                           MMSEG_CONFIG="crfm/segmentation/configs/loveda_segformer_b2.py",
                           WORK_DIR=str(work / "seg_real_synth")),
    )  # fmt: skip
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1, again.stderr[-3000:]
    assert again.stderr.startswith(f"error: {work / 'seg_real_synth'}: holds a segmentor made with other settings")
    assert "synth_root" in again.stderr and (work / "seg_real_synth" / "config.py").read_text() == config


@pytest.mark.parametrize("classes", ["loveda", str(REPO / "crfm" / "data" / "classes" / "loveda.json")])
def test_loveda_class_file_by_name_or_path(rs_samples, tmp_path, classes, capsys):
    from crfm.data.make_index import main

    data = loveda_in_its_own_ids(rs_samples, tmp_path)
    argv = [str(data), "--classes", classes, "--remap", LOVEDA["remap"], "--no_progress"]
    assert main(argv) == 0
    written = json.loads((data / "classes.json").read_text())
    assert (written["classes"], written["palette"]) == (LOVEDA["classes"], LOVEDA["palette"])
    # The samples' own prompts (rs_samples/index.jsonl) name the same classes in the same order.
    expected = {
        Path(json.loads(line)["target"]).name: json.loads(line)["prompt"]
        for line in (rs_samples / "index.jsonl").read_text().splitlines()
        if json.loads(line)["dataset"] == "loveda"
    }
    for line in (data / "index.jsonl").read_text().splitlines():
        item = json.loads(line)
        if not item["target"].endswith("mmseg0_r0c0.png"):  # the tile with the no-data strip
            assert item["prompt"] == expected[Path(item["target"]).name]
