"""crfm.segmentor: index dataset for mmseg, safe checkpoint loading, the differentiable adapter, and the
training script (10 iterations of the toy SegFormer on 8 scenes at 64 px)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, TOY_SEGFORMER

pytest.importorskip("mmseg")

from crfm.data.dataset import load_label  # noqa: E402
from crfm.data.index import IGNORE_INDEX  # noqa: E402
from crfm.segmentation.adapter import SegmentorAdapter, load_segmentor  # noqa: E402
from crfm.segmentation.mmseg_ext import CRFMIndexDataset  # noqa: E402
from crfm.segmentation.safe_load import safe_load_checkpoint  # noqa: E402
from crfm.toy.toydata import CLASSES, PALETTE, write_dataset  # noqa: E402

CONFIG = TOY_SEGFORMER
SIZE = 64


def _env() -> dict[str, str]:
    # One thread per subprocess: the machine is shared; PYTHONPATH so `crfm` imports from this checkout.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    """8 training + 4 validation toy scenes: one generated set, its index split in two."""
    root = tmp_path_factory.mktemp("toyseg")
    index = write_dataset(root, 12, SIZE, seed=3, ignore_prob=0.5)
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:8]))
    (root / "val.jsonl").write_text("".join(lines[8:]))
    return root


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory) -> Path:
    """Work dir of a 10-iteration run of scripts/train_segmentor.py (as a subprocess, so its process-wide
    settings, e.g. forced weights-only loading, stay out of the test process)."""
    work = tmp_path_factory.mktemp("segwork")
    cmd = [sys.executable, str(REPO / "scripts" / "train_segmentor.py"), "--mmseg_config", str(CONFIG)]
    cmd += ["--data_root", str(toy_root), "--json_file", "index.jsonl", "--val_file", "val.jsonl"]
    cmd += ["--work_dir", str(work), "--max_iters", "10", "--batch_size", "2", "--num_cls", "6"]
    cmd += ["--img_size", str(SIZE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final mIoU:" in proc.stdout
    return work


def _build_dataset(toy_root: Path, ann_file: str = "index.jsonl", **kwargs) -> CRFMIndexDataset:
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    cfg = dict(type="CRFMIndexDataset", data_root=str(toy_root), ann_file=ann_file, pipeline=pipeline, **kwargs)
    return DATASETS.build(cfg)


def test_dataset_reads_index_layout(toy_root):
    dataset = _build_dataset(toy_root)
    assert len(dataset) == 8
    assert tuple(dataset.metainfo["classes"]) == CLASSES  # from classes.json beside the index
    assert [tuple(c) for c in dataset.metainfo["palette"]] == list(PALETTE)
    seen: set[int] = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        info = dataset.get_data_info(i)
        assert info["img_path"] == str(toy_root / "img" / f"toy_{i:05d}.png")
        expected = load_label(toy_root / "label" / f"toy_{i:05d}.png")
        got = sample["data_samples"].gt_sem_seg.data.numpy()[0]
        np.testing.assert_array_equal(got, expected)  # class ids unchanged, 255 kept as ignore
        assert sample["inputs"].shape == (3, SIZE, SIZE)
        seen |= set(np.unique(got).tolist())
    assert seen <= set(range(len(CLASSES))) | {IGNORE_INDEX}
    assert IGNORE_INDEX in seen and len(seen - {IGNORE_INDEX}) >= 3


def test_dataset_metainfo_argument_and_reduce_zero_label(toy_root):
    names = [f"c{i}" for i in range(6)]
    dataset = _build_dataset(toy_root, "val.jsonl", metainfo=dict(classes=names, palette=[[0, 0, 0]] * 6))
    assert list(dataset.metainfo["classes"]) == names and len(dataset) == 4
    with pytest.raises(ValueError, match="reduce_zero_label"):
        _build_dataset(toy_root, reduce_zero_label=True)


def test_custom_imports_registers_dataset(toy_root, tmp_path):
    """A fresh interpreter that only loads a config with custom_imports finds the dataset class."""
    config = tmp_path / "cfg.py"
    config.write_text('custom_imports = dict(imports=["crfm.segmentation.mmseg_ext"], allow_failed_imports=False)\n')
    code = (
        "import sys; from mmengine.config import Config; from mmseg.registry import DATASETS; "
        f"Config.fromfile({str(config)!r}); "
        "assert DATASETS.get('CRFMIndexDataset') is not None; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_training_writes_checkpoints(trained):
    for name in ("segmentor.pth", "config.py", "iter_10.pth", "metrics.json"):
        assert (trained / name).is_file(), name
    # segmentor.pth holds only tensors and builtins: loadable weights-only with no allowlist at all.
    ckpt = torch.load(trained / "segmentor.pth", map_location="cpu", weights_only=True)
    assert ckpt["meta"]["dataset_meta"]["classes"] == list(CLASSES)


def test_training_resumes_weights_only(trained, toy_root, tmp_path):
    """A second run in a work dir with a checkpoint resumes through mmengine's own (weights-only) load."""
    import shutil

    work = tmp_path / "resume"
    shutil.copytree(trained, work)
    # The earlier spellings (--config for --mmseg_config, --train_file for --json_file) still work.
    cmd = [sys.executable, str(REPO / "scripts" / "train_segmentor.py"), "--config", str(CONFIG)]
    cmd += ["--data_root", str(toy_root), "--train_file", "index.jsonl", "--work_dir", str(work)]
    cmd += ["--max_iters", "12", "--batch_size", "2"]
    cmd += ["--img_size", str(SIZE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "resumed epoch: 0, iter: 10" in proc.stdout + proc.stderr
    assert (work / "iter_12.pth").is_file()


@pytest.mark.parametrize("name", ["segmentor.pth", "iter_10.pth"])
def test_adapter_logits_and_gradient(trained, name):
    torch.manual_seed(0)
    adapter = load_segmentor(trained / "config.py", trained / name, num_cls=6)
    assert adapter.num_classes == 6 and adapter.class_names == list(CLASSES)
    assert not any(p.requires_grad for p in adapter.parameters()) and not adapter.training
    images = (torch.rand(2, 3, SIZE, SIZE) * 2 - 1).requires_grad_(True)
    logits = adapter(images)
    assert logits.shape == (2, 6, SIZE, SIZE)
    target = torch.randint(0, 6, (2, SIZE, SIZE))
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Other sizes come back at the input resolution too.
    assert adapter(torch.zeros(1, 3, 40, 56)).shape == (1, 6, 40, 56)


def test_num_cls_mismatch_names_both(trained):
    with pytest.raises(ValueError, match=r"num_cls=5.*6"):
        load_segmentor(trained / "config.py", trained / "segmentor.pth", num_cls=5)


def test_missing_keys_reported(trained, tmp_path):
    state = safe_load_checkpoint(trained / "segmentor.pth")
    state.pop("decode_head.conv_seg.weight")
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys: decode_head\.conv_seg\.weight"):
        load_segmentor(trained / "config.py", tmp_path / "partial.pth")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _SneakyGetattr:
    """Asks for an attribute through `getattr`, which mmengine checkpoints need for HistoryBuffer only."""

    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer

        return (getattr, (HistoryBuffer, "__init__"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump", "nested"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(_Evil(marker), path)
    elif writer == "nested":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"x": _Evil(marker)}}, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(_Evil(marker), handle)
    with pytest.raises(pickle.UnpicklingError):
        safe_load_checkpoint(path)
    assert not marker.exists()


def test_getattr_standin_refuses_other_attributes(tmp_path):
    path = tmp_path / "sneaky.pth"
    torch.save({"state_dict": {}, "x": _SneakyGetattr()}, path)
    with pytest.raises(pickle.UnpicklingError):
        safe_load_checkpoint(path)


def test_non_state_dict_is_value_error(tmp_path):
    torch.save({"state_dict": {"w": [1, 2]}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        safe_load_checkpoint(tmp_path / "odd.pth")


def test_safetensors_and_module_prefix(trained, tmp_path):
    from safetensors.torch import save_file

    state = safe_load_checkpoint(trained / "segmentor.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "seg.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    assert safe_load_checkpoint(tmp_path / "ddp.pth").keys() == state.keys()
    images = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    reference = load_segmentor(trained / "config.py", trained / "segmentor.pth")(images)
    for path in (tmp_path / "seg.safetensors", tmp_path / "ddp.pth"):
        torch.testing.assert_close(load_segmentor(trained / "config.py", path)(images), reference)


@pytest.mark.parametrize("bgr_to_rgb", [True, False])
def test_normalisation_matches_mmseg_preprocessor(trained, toy_root, bgr_to_rgb):
    """The adapter feeds exactly what mmseg's pipeline + data_preprocessor feed for the same image file."""
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import PackSegInputs
    from mmseg.models.data_preprocessor import SegDataPreProcessor

    adapter = load_segmentor(trained / "config.py", trained / "segmentor.pth")
    model = adapter.model
    mean, std = [110.0, 120.0, 130.0], [50.0, 60.0, 70.0]
    model.data_preprocessor = SegDataPreProcessor(mean=mean, std=std, bgr_to_rgb=bgr_to_rgb)
    adapter = SegmentorAdapter.from_mmseg(model)
    assert adapter.channel_order == ("rgb" if bgr_to_rgb else "bgr")

    path = toy_root / "img" / "toy_00001.png"
    packed = PackSegInputs()(LoadImageFromFile()({"img_path": str(path)}))  # uint8 BGR, as in training
    expected = model.data_preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]})
    rgb = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32)).permute(2, 0, 1)
    got = adapter.normalise((rgb / 127.5 - 1.0)[None])
    torch.testing.assert_close(got, expected["inputs"], atol=1e-4, rtol=0)


def test_wrap_plain_module():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, kernel_size=2, stride=2)  # half-resolution logits: adapter upsamples
    adapter = SegmentorAdapter(net, mean=[0.5] * 3, std=[0.25] * 3, num_classes=4, scale=1.0, channel_order="bgr")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(adapter.normalise(images), ((images + 1) / 2).flip(1).sub(0.5).div(0.25))
    images.requires_grad_(True)
    logits = adapter(images)
    assert logits.shape == (2, 4, 16, 16) and adapter.class_names == [f"class {i}" for i in range(4)]
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected"):
        SegmentorAdapter(torch.nn.Conv2d(3, 5, 1), [0.0] * 3, [1.0] * 3, num_classes=4)(images)
