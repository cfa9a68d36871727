"""What several test modules share (tests never import each other): paths, a stand-in segmentor, subprocess env."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLES = REPO.parent / "shared" / "rs_samples"
TOY_SEGFORMER = REPO / "crfm" / "segmentation" / "configs" / "toy_segformer.py"
NUM_CLS = 6  # the toy data's classes


def load_script(relative: str) -> ModuleType:
    """A script of the repository that is not in a package (bench/, scripts/), as a module under its file's stem.
    It is registered in sys.modules while it runs, since dataclasses look their module up then."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(path.stem, None)
    return module


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: offline, this checkout importable, no GPU, one thread (2-core CI)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **extra}


class ColourSegmentor(torch.nn.Module):
    """A fixed, differentiable stand-in segmentor: per-pixel linear map of the colour to class logits."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, NUM_CLS, 1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 3)
            self.head.bias.copy_(torch.randn(NUM_CLS, generator=gen))
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images)


def perturb_trainable(model: torch.nn.Module, seed: int = 1, scale: float = 0.02) -> None:
    """Stand-in for training: moves every trained weight (LoRA B starts at zero, so this also activates LoRA)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def vectorized_toy_data(root: Path, pipeline_dir: Path, num: int, size: int = 64, seed: int = 0) -> dict[str, Path]:
    """`num` toy scenes in `root`/data (index.jsonl, and index_.jsonl with the prompt vectors in `root`/vec, encoded
    by the pipeline at `pipeline_dir`): the inputs of train.py, test.py and crfm.reflow."""
    from crfm.data.vectorize import vectorize_index
    from crfm.toy.toydata import write_dataset

    data, vectors = root / "data", root / "vec"
    write_dataset(data, num=num, size=size, seed=seed, progress=False)
    vectorize_index(pipeline_dir, data / "index.jsonl", data / "index_.jsonl", vectors)
    return {"pipe": pipeline_dir, "data": data, "vectors": vectors}
