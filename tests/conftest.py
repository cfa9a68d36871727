"""Shared fixtures: tiny offline SD3 pipelines (built once per session) and the real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SHARED_SAMPLES, perturb_trainable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub access must fail fast, never hang
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning OpenMP workers slow a test module ~7x on a
    2-core machine as soon as another job holds a core; restored afterwards so other test modules keep theirs.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd35_dir(tmp_path_factory) -> Path:
    from crfm.toy.tiny import TinyConfig, save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd35"), TinyConfig(variant="sd3.5"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """An SD3 (not 3.5) pipeline with other widths, so nothing may depend on the default sizes."""
    from crfm.toy.tiny import TinyConfig, save_tiny_pipeline

    config = TinyConfig(variant="sd3", layers=2, heads=2, head_dim=24, clip_l_dim=24, clip_g_dim=40, t5_dim=72, seed=7)
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), config)


@pytest.fixture(scope="session")
def rs_samples() -> Path:
    """The real aerial image–label pairs in ../shared/rs_samples (Dubai CC0 + LoveDA)."""
    if not (SHARED_SAMPLES / "index.jsonl").is_file():
        pytest.skip(f"real samples not found at {SHARED_SAMPLES} (clone the repo next to shared/)")
    return SHARED_SAMPLES


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_sd35_dir, tmp_path_factory) -> Path:
    """A `train.py`-style checkpoint on the tiny SD3.5 pipeline: full mode, trained weights perturbed (seeded)."""
    from crfm.models.mmdit import MaskSD3Transformer2DModel
    from crfm.models.trained_weights import configure_training, save_trained

    model = MaskSD3Transformer2DModel.from_sd3(tiny_sd35_dir)
    configure_training(model, "full")
    perturb_trainable(model, seed=0, scale=0.01)
    meta = {"train_mode": "full", "lora_rank": 4, "num_cls": 6, "base_model": str(tiny_sd35_dir)}
    return save_trained(model, tmp_path_factory.mktemp("trained") / "ckpt", meta)
