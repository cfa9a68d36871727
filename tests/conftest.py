"""Shared fixtures: tiny offline SD3 pipelines (built once per session) and the real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub access must fail fast, never hang
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLES = REPO.parent / "shared" / "rs_samples"


@pytest.fixture(scope="session")
def tiny_sd35_dir(tmp_path_factory) -> Path:
    from crfm.tiny import TinyConfig, save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd35"), TinyConfig(variant="sd3.5"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """An SD3 (not 3.5) pipeline with other widths, so nothing may depend on the default sizes."""
    from crfm.tiny import TinyConfig, save_tiny_pipeline

    config = TinyConfig(variant="sd3", layers=2, heads=2, head_dim=24, clip_l_dim=24, clip_g_dim=40, t5_dim=72, seed=7)
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), config)


@pytest.fixture(scope="session")
def rs_samples() -> Path:
    """The real aerial image–label pairs in ../shared/rs_samples (Dubai CC0 + LoveDA)."""
    if not (SHARED_SAMPLES / "index.jsonl").is_file():
        pytest.skip(f"real samples not found at {SHARED_SAMPLES} (clone the repo next to shared/)")
    return SHARED_SAMPLES
