"""crfm.segmentation.filter (FreeMask filtering of synthetic masks) and crfm.segmentation.hardness (synthetic counts
by mask hardness), and test.py's --num_per_mask_file.

Most tests use a stand-in segmentor whose losses are known in closed form: its logits are 4 x the colour channels,
so a pixel painted in its class's colour (pure red, green or blue) costs RIGHT, one painted in another class's
colour WRONG, and a black one BLACK.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfm.data.index import read_index
from crfm.segmentation import filter as freemask
from crfm.segmentation import hardness, views
from tests.helpers import TOY_SEGFORMER, vectorized_toy_data

CLASSES = ("water", "forest", "field")  # "field" never occurs in the real set
SIZE = 16
SCALE = 4.0
RIGHT = math.log(math.exp(SCALE) + 2) - SCALE  # cross-entropy of a pixel painted in its class's colour
WRONG = math.log(math.exp(SCALE) + 2)  # painted in another class's colour
BLACK = math.log(3)  # no colour: uniform logits
REAL_COLUMNS = (4, 8, 8, 12, 16)  # class-1 columns of each real mask (the rest class 0; row 0 ignored)
MEAN = (RIGHT, 0.75 * RIGHT + 0.25 * WRONG)  # real class means: class 1 is painted wrong in every 4th column


class PaintSegmentor(torch.nn.Module):
    """Logits = SCALE x colour in [0, 1]; raises on call `fail_at` (a run killed there)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        return SCALE * x


@pytest.fixture
def segmentor(monkeypatch):
    """load_segmentor replaced by the stand-in (its num_cls check kept); the adapter maps [-1, 1] to [0, 1]."""
    import crfm.segmentation.adapter as adapter

    state = {"net": PaintSegmentor()}

    def load(config, checkpoint, device="cpu", num_cls=None):
        if num_cls is not None and num_cls != len(CLASSES):
            raise ValueError(f"num_cls={num_cls} differs from the segmentor's {len(CLASSES)} classes ({config})")
        return adapter.SegmentorAdapter(state["net"], [0.0] * 3, [1.0] * 3, len(CLASSES), CLASSES, scale=1.0)

    monkeypatch.setattr(adapter, "load_segmentor", load)
    return state


def paint(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """RGB image: pixel painted in class `colours`'s pure channel, black where it is -1."""
    image = np.zeros((*label.shape, 3), np.uint8)
    for cls in range(3):
        image[colours == cls, cls] = 255
    return image


def write_set(root: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], synthetic: bool = False) -> Path:
    for sub in ("img", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (name, (label, colours)) in enumerate(pairs.items()):
        Image.fromarray(label.astype(np.uint8)).save(root / "label" / f"{name}.png")
        Image.fromarray(paint(label, colours)).save(root / "img" / f"{name}.png")
        line = {"source": f"label/{name}.png", "target": f"img/{name}.png", "prompt": "a satellite image of x"}
        if synthetic:
            line |= {"unit": name, "source_mask": f"label/real{n}.png", "variant": 0, "seed": 0, "crfm": True}
        lines.append(json.dumps(line) + "\n")
    (root / "index.jsonl").write_text("".join(lines))
    classes = {"classes": list(CLASSES), "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]], "ignore_index": 255}
    (root / "classes.json").write_text(json.dumps(classes))
    return root


def real_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pairs = {}
    for n, columns in enumerate(REAL_COLUMNS):
        label = np.zeros((SIZE, SIZE), np.int64)
        label[:, SIZE - columns :] = 1
        label[0] = 255
        colours = np.where(label == 255, -1, label)
        colours[(label == 1) & (np.arange(SIZE) % 4 == 0)] = 2  # class 1 painted wrong in every 4th column
        pairs[f"real{n}"] = (label, colours)
    return pairs


def synthetic_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    label0 = np.zeros((SIZE, SIZE), np.int64)
    label0[SIZE // 2 :] = 1
    colours0 = label0.copy()
    colours0[2, 2] = 1  # class 0 painted as class 1: WRONG > margin x RIGHT -> filtered
    colours0[10, 10] = -1  # class 1 black: BLACK is 1.06 x class 1's mean -> kept at 1.25, filtered at 1.0
    label1 = np.zeros((SIZE, SIZE), np.int64)
    label1[:, : SIZE // 2] = 2  # the class the real set lacks, all painted wrong: kept (no mean to compare with)
    label1[-1] = 255
    colours1 = np.where(label1 == 2, 0, label1)
    colours1[-1] = -1
    label2 = np.ones((SIZE, SIZE), np.int64)
    return {"syn0": (label0, colours0), "syn1": (label1, colours1), "syn2": (label2, label2.copy())}


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    real = write_set(tmp_path / "real", real_pairs())
    synth = write_set(tmp_path / "synth", synthetic_pairs(), synthetic=True)
    for name in ("seg.py", "seg.pth"):  # stand-ins: the class-mean cache records their paths and stamps
        (tmp_path / name).write_text(name)
    return {"real": real, "synth": synth, "config": tmp_path / "seg.py", "ckpt": tmp_path / "seg.pth"}


def cli(data: dict, work: Path, *extra: str) -> list[str]:
    return [
        "--data_root", str(data["real"]), "--mmseg_config", str(data["config"]), "--mmseg_ckpt", str(data["ckpt"]),
        "--num_cls", "3", "--synth_root", str(data["synth"]), "--work_dir", str(work), "--batch_size", "2",
        "--device", "cpu", "--no_progress", *extra,
    ]  # fmt: skip


def run_filter(data: dict, work: Path, *extra: str) -> dict:
    return freemask.filter_synthetic(freemask.build_parser().parse_args(cli(data, work, *extra)))


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def labels(work: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((work / "label").glob("*.png"))}


def test_pixels_above_margin_times_class_mean_are_ignored(data, segmentor, tmp_path, capsys):
    before = {key: digest(data[key]) for key in ("real", "synth")}
    work = tmp_path / "out"
    report = run_filter(data, work)
    printed = capsys.readouterr().out
    assert "| field | – (no real pixels: kept) |" in printed and "| water | 0.0360 |" in printed

    cache = json.loads((work / freemask.CLASS_LOSSES).read_text())
    np.testing.assert_allclose(cache["class_mean_loss"][:2], MEAN, rtol=1e-5)
    assert cache["class_mean_loss"][2] is None and report["kept_without_real_mean"] == ["field"]
    synthetic = synthetic_pairs()
    expected = {name: label.astype(np.uint8) for name, (label, _) in synthetic.items()}
    expected["syn0"][2, 2] = 255  # WRONG > 1.25 x RIGHT; the black pixel (BLACK < 1.25 x mean 1) stays
    got = labels(work)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)

    pixels = np.sum([np.bincount(label[label != 255], minlength=3) for label, _ in synthetic.values()], axis=0)
    assert report["synthetic_pixels"] == pixels.tolist() and report["filtered_pixels"] == [1, 0, 0]
    assert report["overall_filtered_fraction"] == pytest.approx(1 / pixels.sum())
    assert json.loads((work / freemask.REPORT).read_text())["filtered_pixels"] == [1, 0, 0]

    # The output is a dataset: index lines keep their keys, point at the filtered masks, and the images are the
    # synthetic ones; the originals are untouched.
    items = read_index(work / "index.jsonl")
    assert [i.record["unit"] for i in items] == ["syn0", "syn1", "syn2"]
    assert items[0].source == "label/syn0.png" and items[0].record["filtered_fraction"] == pytest.approx(1 / 256)
    assert items[2].record["filtered_fraction"] == 0 and items[2].record["crfm"] is True
    for item in items:
        assert (work / item.target).read_bytes() == (data["synth"] / item.target).read_bytes()
    assert (work / "classes.json").read_bytes() == (data["synth"] / "classes.json").read_bytes()
    assert {key: digest(data[key]) for key in ("real", "synth")} == before

    # Another margin in the same work dir redoes every item: at 1.0 the black pixel's loss is above the limit.
    stricter = run_filter(data, work, "--tolerance_margin", "1.0")
    assert stricter["done_before"] == 0 and stricter["filtered_pixels"] == [1, 1, 0]
    assert labels(work)["syn0"][10, 10] == 255


@pytest.mark.parametrize("count", views.VIEW_COUNTS)
def test_each_view_maps_back_onto_the_image(count):
    """`count` distinct dihedral views, each put back exactly where it came from (a non-square map too)."""
    dihedral = views.dihedral_views(count)
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    seen = {tuple(views.view_of(maps[:, :, :4, :4], *view).flatten().tolist()) for view in dihedral}
    assert len(dihedral) == len(seen) == count and dihedral[0] == (0, False)
    for view in dihedral:
        torch.testing.assert_close(views.back_from_view(views.view_of(maps, *view), *view), maps)


class PositionSegmentor(torch.nn.Module):
    """Logits that ignore the image: a fixed map over the pixels, as an overfitted guide's view-bound beliefs."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1, -1, -1)


def test_losses_averaged_over_views_see_only_what_every_view_agrees_on():
    """One view: the plain cross-entropy. Eight: of the probabilities averaged over the dihedral views, so what a
    segmentor believes only in one orientation is averaged out (a uniform label's loss map becomes symmetric),
    while a segmentor that treats every pixel alike (PaintSegmentor) loses nothing."""
    import torch.nn.functional as F

    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.ones(2, SIZE, SIZE, dtype=torch.long)
    position = PositionSegmentor()
    one = freemask.pixel_losses(position, images, labels)
    torch.testing.assert_close(one, F.cross_entropy(position(images), labels, reduction="none"))
    eight = freemask.pixel_losses(position, images, labels, views=8)
    assert not torch.allclose(eight, one)
    for symmetric in (eight.flip(-1), eight.flip(-2), eight.transpose(-2, -1), torch.rot90(eight, 1, (-2, -1))):
        torch.testing.assert_close(symmetric, eight)
    labels[:, 0, 0] = 255  # ignored pixels cost nothing, the others are unchanged
    ignored = freemask.pixel_losses(position, images, labels, views=8)
    assert ignored[:, 0, 0].eq(0).all() and torch.equal(ignored[:, 1:], eight[:, 1:])
    paint = PaintSegmentor()
    colours = (images > 0.5).float()
    torch.testing.assert_close(
        freemask.pixel_losses(paint, colours, labels, views=8), freemask.pixel_losses(paint, colours, labels)
    )


def test_views_are_recorded_and_a_change_redoes_the_filter(data, segmentor, tmp_path):
    """--views: a per-pixel segmentor filters the same pixels in 8 views as in one; the report and the class-mean
    cache record the views, and another count redoes the means and every item."""
    work = tmp_path / "out"
    one = run_filter(data, work)
    eight = run_filter(data, work, "--views", "8")
    assert eight["done_before"] == 0 and eight["views"] == 8 and one["views"] == 1
    assert eight["filtered_pixels"] == one["filtered_pixels"] == [1, 0, 0]
    assert json.loads((work / freemask.CLASS_LOSSES).read_text())["inputs"]["views"] == 8
    assert json.loads((work / freemask.REPORT).read_text())["views"] == 8
    with pytest.raises(SystemExit):
        freemask.build_parser().parse_args(cli(data, work, "--views", "3"))


def test_a_killed_run_resumes_without_redoing_finished_items(data, segmentor, tmp_path):
    reference = run_filter(data, tmp_path / "reference")
    work = tmp_path / "out"
    # Real set: 3 calls (5 images, batches of 2); synthetic: batches of 2, the second one killed.
    segmentor["net"] = PaintSegmentor(fail_at=5)
    with pytest.raises(RuntimeError, match="killed"):
        run_filter(data, work)
    assert not (work / "index.jsonl").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (work / "label").iterdir()}
    assert sorted(finished) == ["syn0.png", "syn1.png"]
    with (work / freemask.RECORDS).open("a") as handle:
        handle.write('{"unit": "img/syn2.png", "sett')  # a record cut by the kill

    segmentor["net"] = PaintSegmentor()
    resumed = run_filter(data, work)
    assert resumed["done_before"] == 2 and resumed["filtered_now"] == 1
    assert segmentor["net"].calls == 1  # one synthetic batch; the real-set class means came from the cache
    assert {p: (work / "label" / p).stat().st_ino for p in finished} == {p: v[0] for p, v in finished.items()}
    assert {p: (work / "label" / p).stat().st_mtime_ns for p in finished} == {p: v[1] for p, v in finished.items()}
    strip = ("done_before", "filtered_now")
    assert {k: v for k, v in resumed.items() if k not in strip} == {
        k: v for k, v in reference.items() if k not in strip
    }
    assert len(read_index(work / "index.jsonl")) == 3

    again = run_filter(data, work, "--resolution", str(SIZE))  # other inputs: the class means are recomputed
    assert segmentor["net"].calls == 1 + 3 and again["done_before"] == 3  # same means, so the items stand


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--synth_file": "missing.jsonl"}, "--synth_root: no index at"),
        ({"--num_cls": "4"}, "lists 3 classes but --num_cls is 4"),
        ({"--tolerance_margin": "0"}, "--tolerance_margin: must be > 0"),
        ({"--tolerance_margin": "-1"}, "--tolerance_margin: must be > 0"),
        ({"--work_dir": "SYNTH"}, "--work_dir must differ from --synth_root"),
        ({"--json_file": "nope.jsonl"}, "--data_root: no index at"),
    ],
)
def test_bad_input_is_one_error_line_and_no_work_dir(data, segmentor, tmp_path, capsys, change, message):
    argv = cli(data, tmp_path / "out")
    for flag, value in change.items():
        value = str(data["synth"]) if value == "SYNTH" else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert freemask.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_num_cls_the_segmentor_lacks_and_a_corrupt_mask_are_refused(data, segmentor, tmp_path, capsys):
    (data["real"] / "classes.json").unlink()
    (data["synth"] / "classes.json").unlink()
    assert freemask.main(cli(data, tmp_path / "out", "--num_cls", "4")) == 2
    assert "num_cls=4 differs from the segmentor's 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    (data["synth"] / "label" / "syn1.png").write_bytes(b"not a png")
    assert freemask.main(cli(data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "syn1.png" in err[0], err
    assert not (tmp_path / "out").exists()  # every pair is opened before the class means are computed and cached


def test_hardness_counts_follow_the_rank(data, segmentor, tmp_path, capsys):
    out = tmp_path / "counts.json"
    argv = ["--data_root", str(data["real"]), "--mmseg_config", str(data["config"]), "--mmseg_ckpt"]
    argv += [str(data["ckpt"]), "--num_cls", "3", "--out", str(out), "--no_progress"]
    assert hardness.main(argv) == 0
    assert "| label/real4.png |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    sources = [f"label/real{n}.png" for n in range(len(REAL_COLUMNS))]
    expected = [((SIZE - c) * RIGHT + c * MEAN[1]) / SIZE for c in REAL_COLUMNS]  # pixel-weighted class means
    np.testing.assert_allclose([result["hardness"][s] for s in sources], expected, rtol=1e-5)
    assert [result["counts"][s] for s in sources] == [1, 3, 3, 4, 5]  # equal hardness, equal count
    assert result["min_per_mask"] == 1 and result["max_per_mask"] == 5 and result["classes"] == list(CLASSES)

    assert hardness.main([*argv, "--min_per_mask", "3", "--max_per_mask", "2"]) == 2
    assert "error: --max_per_mask: must be >= --min_per_mask 3, got 2" in capsys.readouterr().err


@pytest.mark.parametrize("low, high", [(1, 5), (1, 20), (0, 3), (2, 2)])
def test_counts_by_rank_are_monotone_and_span_min_to_max(low, high):
    scores = np.random.default_rng(low + high).random(37)
    scores[5] = scores[6]  # a tie
    counts = hardness.counts_by_rank(scores, low, high)
    order = np.argsort(scores)
    assert np.all(np.diff(counts[order]) >= 0) and counts[5] == counts[6]
    assert counts.min() == low and counts.max() == high
    assert abs(counts.mean() - (low + high) / 2) <= 0.5


# --- the real mmseg path: an untrained toy SegFormer, and the output read by the downstream tool's dataset ---


def test_with_an_mmseg_segmentor_the_output_is_a_downstream_dataset(tmp_path):
    pytest.importorskip("mmseg")
    from mmengine.registry import init_default_scope
    from mmseg.apis import init_model
    from mmseg.registry import DATASETS

    from crfm.toy.toydata import write_dataset

    write_dataset(tmp_path / "real", 3, 32, seed=1, progress=False)
    write_dataset(tmp_path / "synth", 3, 32, seed=2, progress=False)
    torch.manual_seed(0)
    model = init_model(str(TOY_SEGFORMER), device="cpu")
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "seg.pth")
    work = tmp_path / "out"
    argv = ["--data_root", str(tmp_path / "real"), "--mmseg_config", str(TOY_SEGFORMER), "--mmseg_ckpt"]
    argv += [str(tmp_path / "seg.pth"), "--num_cls", "6", "--synth_root", str(tmp_path / "synth")]
    argv += ["--work_dir", str(work), "--device", "cpu", "--no_progress", "--tolerance_margin", "1.0"]
    assert freemask.main(argv) == 0
    report = json.loads((work / freemask.REPORT).read_text())
    assert sum(report["synthetic_pixels"]) > 0 and 0 < report["overall_filtered_fraction"] < 1

    init_default_scope("mmseg")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    dataset = DATASETS.build(
        dict(type="CRFMIndexDataset", data_root=str(work), ann_file="index.jsonl", pipeline=pipeline)
    )
    assert len(dataset) == 3
    sample = dataset[0]
    stored = np.asarray(Image.open(work / read_index(work / "index.jsonl")[0].source))
    np.testing.assert_array_equal(sample["data_samples"].gt_sem_seg.data.numpy()[0], stored)


# --- test.py --num_per_mask_file: per-mask counts, the uniform run's noise for the shared units ---


@pytest.fixture(scope="module")
def synth_setup(tiny_sd35_dir, trained_checkpoint, tmp_path_factory) -> dict:
    toy = vectorized_toy_data(tmp_path_factory.mktemp("counts"), tiny_sd35_dir, num=3, seed=4)
    return {**toy, "ckpt": trained_checkpoint}


def synth_cli(setup: dict, work: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(setup["pipe"]), "--data_root", str(setup["data"]),
        "--lora_ckpt", str(setup["ckpt"]), "--vectors_path", str(setup["vectors"]), "--num_cls", "6",
        "--resolution", "32", "--num_inference_steps", "2", "--work_dir", str(work), "--no_progress", *extra,
    ]  # fmt: skip


def test_num_per_mask_file_reproduces_the_uniform_runs_units(synth_setup, tmp_path):
    from crfm.sampling.synthesis import build_parser, synthesize

    sources = [item.source for item in read_index(synth_setup["data"] / "index_.jsonl")]
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"counts": dict(zip(sources, [2, 0, 1], strict=True)), "hardness": {}}))
    synthesize(build_parser().parse_args(synth_cli(synth_setup, tmp_path / "uniform", "--num_per_mask", "2")))
    summary = synthesize(
        build_parser().parse_args(synth_cli(synth_setup, tmp_path / "file", "--num_per_mask_file", str(counts)))
    )
    assert summary["units"] == 3 and not summary["failures"]
    units = [item.record["unit"] for item in read_index(tmp_path / "file" / "index.jsonl")]
    assert units == ["00000_toy_00000_v0", "00000_toy_00000_v1", "00002_toy_00002_v0"]
    for unit in units:  # same (mask, variant), same noise, same image
        image = f"img/{unit}.png"
        assert (tmp_path / "file" / image).read_bytes() == (tmp_path / "uniform" / image).read_bytes(), unit


@pytest.mark.parametrize(
    "counts, message",
    [
        ({"label/toy_00000.png": 1, "label/toy_00001.png": 1}, "has no count for mask label/toy_00002.png"),
        ({"label/toy_00000.png": 1, "label/toy_00001.png": -1, "label/toy_00002.png": 1}, "integers >= 0"),
        ({"label/toy_00000.png": 1.5, "label/toy_00001.png": 1, "label/toy_00002.png": 1}, "integers >= 0"),
    ],
)
def test_a_bad_counts_file_is_refused_before_any_output(synth_setup, tmp_path, capsys, counts, message):
    from crfm.fewstep import pairs as reflow_pairs
    from crfm.sampling import synthesis

    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"counts": counts}))
    assert synthesis.main(synth_cli(synth_setup, tmp_path / "out", "--num_per_mask_file", str(path))) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
    # crfm.reflow records noise ids by --num_per_mask; it refuses a counts file rather than mislabel them.
    assert reflow_pairs.main(synth_cli(synth_setup, tmp_path / "out", "--num_per_mask_file", str(path))) == 2
    assert "--num_per_mask_file" in capsys.readouterr().err and not (tmp_path / "out").exists()
