"""`python -m crfm.report`: the contact sheet with its class legend and the per-class table of downstream rows, from
work folders as the recipe leaves them (here written by hand, with known numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from crfm.report import main
from crfm.utils.viz import class_legend

CLASSES = ["background", "building", "road"]
PALETTE = [[255, 255, 255], [255, 0, 0], [255, 255, 0]]


def _synthetic(root: Path, n: int = 5) -> Path:
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    lines = []
    for i in range(n):
        label = np.full((16, 16), i % 3, np.uint8)
        label[:4] = 255
        Image.fromarray(label).save(root / "label" / f"{i}.png")
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
        lines.append({"source": f"label/{i}.png", "target": f"img/{i}.png", "prompt": "a satellite image of road"})
    (root / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "palette": PALETTE, "ignore_index": 255}))
    return root


def _run(folder: Path, miou: float, ious: list[float], synthetic: int) -> Path:
    folder.mkdir(parents=True)
    metrics = {"mIoU": miou, "aAcc": 80.0, "iters": 100, "real_train": 7, "synthetic_train": synthetic}
    metrics.update({f"IoU.{name}": iou for name, iou in zip(CLASSES, ious, strict=True)})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_contact_sheet_and_table_per_class(tmp_path, capsys):
    synth = _synthetic(tmp_path / "synth")
    real = _run(tmp_path / "seg_real", 40.0, [50.0, 30.0, float("nan")], 0)
    mixed = _run(tmp_path / "seg_real_synth", 45.5, [52.25, 38.75, float("nan")], 5)
    fidelity = tmp_path / "fidelity.json"
    fidelity.write_text(json.dumps({"mIoU": 0.25, "aAcc": 0.5, "items": 5, "scorer": {"role": "guide"}}))
    argv = ["--synth_root", str(synth), "--runs", f"real only={real}", f"real + CRFM={mixed}", "--fidelity",
            str(fidelity), "--out", str(tmp_path / "report"), "--columns", "2"]  # fmt: skip
    assert main(argv) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert report in capsys.readouterr().out
    assert "| IoU building | 30.00 | 38.75 | +8.75 |" in report and "| IoU road | - | - | - |" in report
    assert "| **mIoU** | 40.00 | 45.50 | +5.50 |" in report and "| real / synthetic images | 7 / 0 | 7 / 5 |" in report
    assert "mIoU 25.00, aAcc 50.00 (5 images); scored by the CRFM guide" in report and "inflated" in report
    sheet = np.asarray(Image.open(tmp_path / "report" / "contact_sheet.png").convert("RGB"))
    # 3 rows of 2 image-mask pairs (16 px cells, 4 px gaps) under a title strip, then the legend with every colour.
    assert sheet.shape[1] == 4 * 16 + 3 * 4
    colours = {tuple(c) for c in sheet.reshape(-1, 3)}
    assert {(255, 0, 0), (255, 255, 0), (0, 0, 0)} <= colours  # building, road, ignore (mask rows and legend)
    legend = np.asarray(class_legend(CLASSES, PALETTE, sheet.shape[1]))  # under the grid, wrapped to its width
    assert np.array_equal(sheet[-legend.shape[0] :], legend) and legend.shape[0] > 12  # more than one line
    swatches = {tuple(c) for c in legend.reshape(-1, 3)}
    assert {(255, 0, 0), (255, 255, 0), (0, 0, 0)} <= swatches


def test_bad_run_folder_is_one_line(tmp_path, capsys):
    assert main(["--runs", f"real only={tmp_path}", "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --runs real only={tmp_path}: no metrics.json in {tmp_path} (has the run finished?)\n"
    assert main(["--runs", "no-equals-sign", "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == "error: --runs no-equals-sign: expected NAME=WORK_DIR\n"
    assert not (tmp_path / "report").exists()
