"""Dataset index (`index.jsonl`) reading and validation, class lists, and the paper's prompt rule.

An index line is `{"source": label path, "target": image path, "prompt": text}` with paths relative
to the data root; any further keys (e.g. "index" added by vectorize, "dataset") are kept. Labels are
single-channel PNGs of class indices with 255 as "ignore".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfm.utils.constants import IGNORE_INDEX
from crfm.utils.errors import DatasetError, unreadable

REQUIRED_KEYS = ("source", "target", "prompt")


PROMPT_PREFIX = "a satellite image of "


CLASSES_FILE = "classes.json"  # beside an index: {"classes", "palette", "ignore_index"}


@dataclass(frozen=True)
class IndexItem:
    line: int  # 1-based line number in the index file, for error messages
    source: str  # label path relative to the data root
    target: str  # image path relative to the data root
    prompt: str
    record: dict = field(repr=False)  # the whole JSON object, extra keys included
    index_file: str = ""  # where the line came from, for error messages

    def where(self) -> str:
        return f"{self.index_file}:{self.line} ({self.target})"


def read_index(
    index_file: str | Path, data_root: str | Path | None = None, check_files: bool = True
) -> list[IndexItem]:
    """Parse and validate every line before returning; raises `DatasetError` listing all bad lines.

    `data_root` defaults to the index file's folder. `"prompts"` is accepted as an alias of `"prompt"`
    (the original scripts renamed the key in their output index).
    """
    index_file = Path(index_file)
    if not index_file.is_file():
        raise DatasetError(f"{index_file}: index file not found")
    root = Path(data_root) if data_root is not None else index_file.parent
    items: list[IndexItem] = []
    problems: list[str] = []
    with index_file.open(encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{index_file}:{line_no}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            if "prompt" not in record and "prompts" in record:
                record = {**record, "prompt": record["prompts"]}
            missing = [k for k in REQUIRED_KEYS if k not in record]
            if missing:
                problems.append(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
                continue
            wrong_type = [k for k in REQUIRED_KEYS if not isinstance(record[k], str)]
            if wrong_type:
                problems.append(f"{where}: key(s) {', '.join(repr(k) for k in wrong_type)} must be strings")
                continue
            if check_files:
                absent = [record[k] for k in ("source", "target") if not (root / record[k]).is_file()]
                if absent:
                    problems.append(f"{where}: file(s) not found under {root}: {', '.join(absent)}")
                    continue
            items.append(
                IndexItem(line_no, record["source"], record["target"], record["prompt"], record, str(index_file))
            )
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DatasetError(f"{len(problems)} bad line(s) in {index_file}:\n  " + "\n  ".join(shown) + more)
    if not items:
        raise DatasetError(f"{index_file} holds no items")
    return items


def read_classes_json(path: str | Path) -> dict:
    """`classes.json` ({"classes", "palette", "ignore_index"}) as mmseg metainfo (classes, palette)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise unreadable(path, "the class list", exc) from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise ValueError(f"{path}: expected an object with a 'classes' list")
    ignore = meta.get("ignore_index", IGNORE_INDEX)
    if ignore != IGNORE_INDEX:
        # The loss and IoUMetric ignore 255; another value would silently be trained on as a class.
        raise ValueError(f"{path}: ignore_index {ignore} is not supported, labels must use {IGNORE_INDEX}")
    out: dict = {"classes": tuple(meta["classes"])}
    if meta.get("palette"):
        out["palette"] = [list(c) for c in meta["palette"]]
    return out


def describe_label(label: np.ndarray, class_names: Sequence[str], min_fraction: float = 0.001) -> str:
    """Prompt naming the classes that cover >= `min_fraction` of the labelled pixels, largest first.

    The rule the real sample data's prompts follow; ties are broken by class id for determinism.
    """
    valid = label[label != IGNORE_INDEX]
    if valid.size == 0:
        return PROMPT_PREFIX.removesuffix(" of ")  # nothing labelled: no class list to give
    counts = np.bincount(valid.ravel(), minlength=len(class_names))
    present = [c for c in range(len(class_names)) if counts[c] > 0 and counts[c] >= min_fraction * valid.size]
    present.sort(key=lambda c: (-int(counts[c]), c))
    return PROMPT_PREFIX + ", ".join(class_names[c] for c in present)
