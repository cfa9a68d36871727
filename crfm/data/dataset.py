"""Image–mask pairs: decoding with clear errors, the shared resize geometry, and the training dataset."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crfm.data.index import IGNORE_INDEX, DatasetError, IndexItem
from crfm.utils.errors import one_line, unreadable


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, turning decoder errors into a `DatasetError` naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError) as exc:
        raise unreadable(path, "image", exc) from exc


def load_label(path: str | Path, num_cls: int | None = None) -> np.ndarray:
    """Open a class-index label as uint8 HxW; with `num_cls`, reject ids >= num_cls other than 255."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"label {path} has mode {img.mode}: expected a single-channel class-index PNG "
                    "(convert colour masks to class ids first)"
                )
            label = np.array(img)
    except (OSError, SyntaxError) as exc:
        raise unreadable(path, "label", exc) from exc
    if label.max(initial=0) > IGNORE_INDEX:
        raise DatasetError(f"label {path} has values above 255; class ids must fit in uint8")
    label = label.astype(np.uint8)
    if num_cls is not None:
        bad = np.unique(label[(label >= num_cls) & (label != IGNORE_INDEX)])
        if bad.size:
            raise DatasetError(
                f"label {path} has class id(s) {bad.tolist()} >= num_cls={num_cls} (only 255 may exceed it)"
            )
    return label


def resize_center_crop(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Scale the short side to `size`, then crop the centre square — keeps aspect ratio and scale cues."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), resample=resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image, resolution: int | None = None) -> torch.Tensor:
    """An RGB image -> float32 3xHxW in [-1, 1], resized and centre-cropped to `resolution` if given."""
    if resolution is not None:
        image = resize_center_crop(image, resolution, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def load_index_images(index_file: str | Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Every image of an index (data root = its folder) at `resolution`, [N, 3, H, W] in [-1, 1], and the
    prompts; labels are not read (an unlabelled corpus)."""
    from crfm.data.index import read_index

    index_file = Path(index_file)
    items = read_index(index_file, index_file.parent, check_files=False)
    images = [image_to_tensor(load_image(index_file.parent / item.target), resolution) for item in items]
    return torch.stack(images), [item.prompt for item in items]


def load_pair(data_root: str | Path, item: IndexItem, num_cls: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """An item's RGB image and uint8 label, checked as every crfm reader needs them: both decodable, the label a
    single-channel class-index map (ids < `num_cls` or 255), image and label of one size. A fault is a
    `DatasetError` naming the index line first (`index.jsonl:2 (img/x.png): label ... has class id(s) [9] ...`)."""
    data_root = Path(data_root)
    try:
        image = load_image(data_root / item.target)
        label = load_label(data_root / item.source, num_cls)
    except DatasetError as exc:
        raise DatasetError(f"{item.where()}: {exc}") from exc
    if image.size != (label.shape[1], label.shape[0]):
        raise DatasetError(
            f"{item.where()}: image size {image.size} differs from label size {(label.shape[1], label.shape[0])}"
        )
    return image, label


def check_index_pairs(
    data_root: str | Path, json_file: str, num_cls: int | None = None, progress: bool = False
) -> list[IndexItem]:
    """Read the index `data_root/json_file` and open every pair of it as `load_pair` does, before a job writes
    anything or loads a model: its items, or one `DatasetError` line naming the first bad item (and how many
    more are bad), so a colour mask or a class id >= num_cls is never found by a traceback half-way."""
    from tqdm.auto import tqdm

    from crfm.data.index import read_index

    items = read_index(Path(data_root) / json_file, data_root)
    bad: list[str] = []
    for item in tqdm(items, desc=f"checking {json_file}", unit="pair", leave=False, disable=not progress):
        try:
            load_pair(data_root, item, num_cls)
        except DatasetError as exc:
            bad.append(one_line(exc))
    if bad:
        more = f" (and {len(bad) - 1} more bad pair(s) in this index)" if len(bad) > 1 else ""
        raise DatasetError(bad[0] + more)
    return items


def check_indexes_pairs(
    indexes: Iterable[tuple[str | Path | None, str]], num_cls: int | None = None, progress: bool = False
) -> None:
    """`check_index_pairs` on each (data root, index file) of a job that reads several (a root of None: not given)."""
    for data_root, json_file in indexes:
        if data_root is not None:
            check_index_pairs(data_root, json_file, num_cls, progress)


class PairDataset(torch.utils.data.Dataset):
    """Image–mask–prompt triples from an index; optionally with the prompt vectors made by vectorize.

    Returns dicts with `image` (float32 3xHxW in [-1, 1]), `label` (int64 HxW, 255 = ignore),
    `prompt`, `position` (row in the index) and, with `vectors_dir`, `prompt_embeds` and
    `pooled_prompt_embeds`.
    """

    def __init__(
        self,
        items: Sequence[IndexItem],
        data_root: str | Path,
        resolution: int | None = None,
        num_cls: int | None = None,
        vectors_dir: str | Path | None = None,
    ) -> None:
        self.items = list(items)
        self.data_root = Path(data_root)
        self.resolution = resolution
        self.num_cls = num_cls
        self.vectors_dir = Path(vectors_dir) if vectors_dir is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        item = self.items[position]
        image, label_array = load_pair(self.data_root, item, self.num_cls)
        label = Image.fromarray(label_array)
        pixels = image_to_tensor(image, self.resolution)
        if self.resolution is not None:
            label = resize_center_crop(label, self.resolution, Image.Resampling.NEAREST)
        sample = {
            "image": pixels,
            "label": torch.from_numpy(np.asarray(label, dtype=np.int64)),
            "prompt": item.prompt,
            "position": position,
        }
        if self.vectors_dir is not None:
            from crfm.data.vectors import load_item_vectors

            sample.update(load_item_vectors(self.vectors_dir, item))
        return sample
