"""crfm's mmseg extensions, registered on import: the one module configs name in `custom_imports`.

- `CRFMIndexDataset` (mmseg `DATASETS`): our `index.jsonl` layout as an mmseg dataset;
- `MixedSourceSampler` (mmseg `DATA_SAMPLERS`): draws real vs synthetic samples at a set ratio;
- `CachedCompose` (mmseg `TRANSFORMS`): mmcv's `Compose` of deterministic steps, run once per image;
- `PerClassIoUMetric` (mmseg `METRICS`): mmseg's `IoUMetric` that also returns each class's IoU.

    custom_imports = dict(imports=["crfm.segmentation.mmseg_ext"], allow_failed_imports=False)
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from mmcv.transforms import Compose
from mmengine.dist import get_dist_info, sync_random_seed
from mmseg.datasets import BaseSegDataset
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATA_SAMPLERS, DATASETS, METRICS, TRANSFORMS
from torch.utils.data import Sampler

from crfm.data.index import CLASSES_FILE, IGNORE_INDEX, read_classes_json, read_index

MMSEG_EXTENSIONS = __name__  # what a config lists in custom_imports to get these registrations
# mmseg's own decode heads build their losses through its deprecated `build_loss`, warning once per process that
# builds a model: nothing a config or a user can change, so it is dropped here, where every crfm config imports.
warnings.filterwarnings("ignore", message=r"``build_loss`` would be deprecated", category=UserWarning)


@DATASETS.register_module()
class CRFMIndexDataset(BaseSegDataset):
    """An `index.jsonl` (lines `{"source": label png, "target": image, "prompt": ...}`) as an mmseg dataset.

    `ann_file` is the index (relative to `data_root` unless absolute); paths in it are relative to
    `data_root`, or to the index's folder when `data_root` is not given. Class names and palette come from
    `metainfo` if passed, else from a `classes.json` beside the index. Labels hold class ids with 255 as
    ignore, so `reduce_zero_label` is always False.
    """

    def __init__(self, ann_file: str = "", metainfo: dict | None = None, data_root: str | None = None, **kwargs):
        if kwargs.pop("reduce_zero_label", False):
            raise ValueError("CRFMIndexDataset labels are class ids with 255 = ignore; reduce_zero_label must be False")
        index = Path(ann_file)
        if data_root and not index.is_absolute():
            index = Path(data_root) / index
        if metainfo is None or "classes" not in metainfo:
            classes_json = index.parent / CLASSES_FILE
            if classes_json.is_file():
                metainfo = {**read_classes_json(classes_json), **(metainfo or {})}
        # BaseSegDataset defaults '.jpg' / '.png' suffixes and data_prefix; neither is used by our index.
        kwargs.setdefault("ignore_index", IGNORE_INDEX)
        super().__init__(ann_file=ann_file, metainfo=metainfo, data_root=data_root, reduce_zero_label=False, **kwargs)

    def load_data_list(self) -> list[dict]:
        root = Path(self.data_root) if self.data_root else Path(self.ann_file).parent
        items = read_index(self.ann_file, root)  # validates every line and that both files exist
        return [
            {
                "img_path": str(root / item.target),
                "seg_map_path": str(root / item.source),
                "label_map": self.label_map,
                "reduce_zero_label": False,
                "seg_fields": [],
                "prompt": item.prompt,
            }
            for item in items
        ]


@DATA_SAMPLERS.register_module()
class MixedSourceSampler(Sampler):
    """Infinite sampler over an mmengine `ConcatDataset` that picks sub-dataset `k` with probability
    `weights[k] / sum(weights)` for every sample, then takes that source's next index from its own reshuffled
    cycle (so within a source every sample is seen once per cycle). Ranks take interleaved slices of one
    seeded stream, as mmengine's `InfiniteSampler` does."""

    def __init__(self, dataset, weights: Sequence[float], seed: int | None = None) -> None:
        sizes = [len(d) for d in dataset.datasets]
        if len(weights) != len(sizes):
            raise ValueError(f"{len(weights)} weights for {len(sizes)} datasets")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        if any(size == 0 and w > 0 for size, w in zip(sizes, weights, strict=True)):
            raise ValueError(f"a dataset with weight > 0 is empty (sizes {sizes})")
        self.rank, self.world_size = get_dist_info()
        self.seed = sync_random_seed() if seed is None else seed
        self.sizes = sizes
        self.offsets = [0, *itertools.accumulate(sizes)][:-1]
        self.probabilities = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.size = len(dataset)

    def _stream(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        cycles = [iter(()) for _ in self.sizes]
        while True:
            for source in torch.multinomial(self.probabilities, 1024, replacement=True, generator=gen).tolist():
                index = next(cycles[source], None)
                if index is None:  # this source's cycle is used up: start a fresh permutation
                    cycles[source] = iter(torch.randperm(self.sizes[source], generator=gen).tolist())
                    index = next(cycles[source])
                yield self.offsets[source] + index

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self._stream(), self.rank, None, self.world_size)

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Infinite stream: nothing depends on the epoch (mmengine calls this on every sampler)."""


@TRANSFORMS.register_module()
class CachedCompose(Compose):
    """mmcv's `Compose`, whose output for a sample (its image and label paths) is computed once and copied after.

    Only for deterministic steps (loading, a fixed-size resize), and for datasets that fit in memory: a small-image
    training run draws each of a few dozen images hundreds of times, and decoding the PNGs again each time was an
    eighth of the toy segmentors' step. Random transforms go after it, so every draw is still augmented anew.
    """

    def __init__(self, transforms) -> None:
        super().__init__(transforms)
        self._cache: dict[tuple[str, str | None], dict | None] = {}

    def transform(self, results: dict) -> dict | None:
        key = (results["img_path"], results.get("seg_map_path"))
        if key not in self._cache:
            self._cache[key] = super().transform(results)
        return copy.deepcopy(self._cache[key])


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """mmseg's `IoUMetric` whose result also holds `IoU.<class name>` (%) per class, as its log table shows them: which
    classes a data source helps is the question a downstream comparison asks, and the mean hides it. NaN for a class
    in neither the labels nor the predictions."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        intersect, union, predicted, labelled = (sum(areas) for areas in zip(*results, strict=True))
        per_class = self.total_area_to_metrics(  # as the parent computes them, its NaN handling included
            intersect, union, predicted, labelled, ["mIoU"], self.nan_to_num, self.beta
        )["IoU"]
        names = self.dataset_meta["classes"]
        per_class_metrics = {f"IoU.{name}": round(float(v) * 100, 2) for name, v in zip(names, per_class, strict=True)}
        return {**metrics, **per_class_metrics}
