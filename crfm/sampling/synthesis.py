"""Dataset synthesis: label masks (+ prompts) -> new image-mask pairs, with CRFM when a segmentor is given.

The output folder is a dataset in crfm's layout: `img/`, `label/` (the conditioning masks at the output
resolution), `index.jsonl` (input lines with new paths, prompts kept) and, with `--debug`, `debug/` panels
(synthesized | colourised mask | real image). Work is split over `accelerate launch` processes (unit j goes to
process j mod P); every unit's files are written atomically before its index line, so a killed run resumes by
skipping finished units and never leaves a line without its files.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from crfm.data.dataset import load_image, load_label, resize_center_crop
from crfm.data.index import CLASSES_FILE, DatasetError, IndexItem, read_classes_json, read_index
from crfm.data.vectors import load_item_vectors
from crfm.sampling.pipeline import MaskToImageOutput, MaskToImagePipeline, negative_prompt_kwargs
from crfm.sampling.rectify import CRFMConfig
from crfm.sampling.sampler import SolverConfig, to_uint8
from crfm.utils.fileio import atomic_path, write_jsonl_atomic, write_text_atomic
from crfm.utils.flags import (
    UsageError,
    add_data_flags,
    add_model_flags,
    add_run_flags,
    add_segmentor_flags,
    entry_point,
    report_error,
    resolve_dtype,
)

SHARD_PATTERN = "index.rank{rank}.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="test.py", description="Synthesize image-mask pairs with the trained MM-DiT (+ CRFM with a segmentor)."
    )
    add_model_flags(parser, checkpoint=True, mask_encoding=True)
    add_data_flags(
        parser, "index_.jsonl", "masks' index written by preprocess/vectorize.py", vectors=True,
        data_root_help="folder of the masks' index (index paths are relative to it)",
    )  # fmt: skip
    add = parser.add_argument
    add("--work_dir", default="work_dirs/synth", help="output dataset folder")
    add("--num_inference_steps", type=int, default=28, help="sampling steps (the paper: 23; rk45: CRFM's grid)")
    add("--guidance_scale", type=float, default=1.0, help="classifier-free guidance (1.0: off)")
    add("--resolution", type=int, default=512, help="output side, px (masks resized + centre-cropped)")
    add("--batch_size", type=int, default=1, help="images per sampler call")
    add("--num_per_mask", type=int, default=1, help="variants per mask (different seeds)")
    add("--debug", action="store_true", help="also write synthesized | mask | real panels")
    add("--vae_tiling", action="store_true", help="tiled VAE decoding (large images)")
    add_run_flags(
        parser, seed_help="noise seed (drawn per item and variant, so independent of batching)", mixed_precision=True
    )
    add_segmentor_flags(parser, required=False, purpose="of the CRFM guide (CRFM on with --mmseg_ckpt)")
    SolverConfig.add_flags(parser)
    CRFMConfig.add_flags(parser)
    return parser


def unit_name(position: int, item: IndexItem, variant: int) -> str:
    return f"{position:05d}_{Path(item.target).stem}_v{variant}"


def image_outputs(record: dict) -> list[str]:
    """The files a synthesized unit's index line stands for (relative to the work dir)."""
    return [record["target"], record["source"]]


def read_done(work_dir: Path, outputs: Callable[[dict], list[str]] = image_outputs) -> dict[str, dict]:
    """Finished units from every rank's shard: name -> output record (only those whose `outputs` files exist)."""
    done: dict[str, dict] = {}
    for shard in sorted(work_dir.glob(SHARD_PATTERN.format(rank="*"))):
        for line in shard.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if all((work_dir / path).is_file() for path in outputs(record)):
                done[record["unit"]] = record
    return done


def _resize_label(label: np.ndarray, size: int) -> np.ndarray:
    """Short side to `size`, centre crop — the same geometry as `PairDataset` uses for images."""
    return np.asarray(resize_center_crop(Image.fromarray(label), size, Image.Resampling.NEAREST))


def load_batch(units: list[tuple[int, IndexItem, int]], args: argparse.Namespace, failures: list[str]) -> list:
    """Masks and prompt vectors of `units`; a bad item is reported (one line) and left out, the rest go on."""
    batch = []
    for pos, item, k in units:
        try:
            label = _resize_label(load_label(Path(args.data_root) / item.source, args.num_cls), args.resolution)
            batch.append((pos, item, k, label, load_item_vectors(args.vectors_path, item)))
        except DatasetError as exc:
            failures.append(f"{item.where()}: {exc}")
            report_error(failures[-1])
    return batch


def write_unit(work_dir: Path, name: str, image: np.ndarray, label: np.ndarray) -> None:
    for folder, array in (("img", image), ("label", label.astype(np.uint8))):
        with atomic_path(work_dir / folder / f"{name}.png") as tmp:
            Image.fromarray(array).save(tmp)


def merge_shards(
    work_dir: Path, units: list, data_root: Path, outputs: Callable[[dict], list[str]] = image_outputs
) -> list[dict]:
    """Every rank's finished units, in plan order, as the dataset's `index.jsonl` (+ the classes beside it)."""
    merged = read_done(work_dir, outputs)
    order = {unit_name(p, i, k): n for n, (p, i, k) in enumerate(units)}
    records = sorted((r for r in merged.values() if r["unit"] in order), key=lambda r: order[r["unit"]])
    write_jsonl_atomic(work_dir / "index.jsonl", records)
    classes = data_root / CLASSES_FILE
    if classes.is_file():
        write_text_atomic(work_dir / CLASSES_FILE, classes.read_text())
    return records


class UnitWriter(Protocol):
    """What a run over (mask, variant) units keeps of each batch: `write` stores a batch's files atomically and
    returns one index record per unit (with its "unit" name); `outputs` lists a record's files."""

    name: str
    save_at: tuple[int, ...]
    folders: tuple[str, ...]

    def write(self, work_dir: Path, batch: list, out: MaskToImageOutput) -> list[dict]: ...

    def outputs(self, record: dict) -> list[str]: ...


class ImageWriter:
    """test.py's output: one image and its mask (+ a debug panel) per unit, a dataset index line each."""

    name = "synthesize"
    save_at: tuple[int, ...] = ()

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.folders = ("img", "label", *(("debug",) if args.debug else ()))

    def outputs(self, record: dict) -> list[str]:
        return image_outputs(record)

    def write(self, work_dir: Path, batch: list, out: MaskToImageOutput) -> list[dict]:
        args, records = self.args, []
        for (pos, item, k, label, _), image in zip(batch, to_uint8(out.images), strict=True):
            name = unit_name(pos, item, k)
            write_unit(work_dir, name, image, label)
            if args.debug:
                write_panel(work_dir / "debug" / f"{name}.png", image, label, Path(args.data_root) / item.target, args)
            records.append(
                {
                    **{key: v for key, v in item.record.items() if key not in ("index",)},
                    "source": f"label/{name}.png",
                    "target": f"img/{name}.png",
                    "unit": name,
                    "source_mask": item.source,
                    "variant": k,
                    "seed": args.seed,
                    "crfm": args.mmseg_config is not None,
                }
            )
        return records


def synthesize(args: argparse.Namespace) -> dict:
    """test.py: synthesize a dataset (images + masks) from the masks' index."""
    return run_units(args, ImageWriter(args))


def run_units(args: argparse.Namespace, writer: UnitWriter) -> dict:
    """Sample every (mask, variant) unit of the index not finished yet (this process's share) and keep what
    `writer` keeps; returns a summary. The one sampling loop of test.py and crfm.reflow."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    data_root, work_dir = Path(args.data_root), Path(args.work_dir)
    if (args.mmseg_config is None) != (args.mmseg_ckpt is None):
        raise UsageError("CRFM needs both --mmseg_config and --mmseg_ckpt")
    items = read_index(data_root / args.json_file, data_root)
    units = [(pos, item, k) for pos, item in enumerate(items) for k in range(args.num_per_mask)]
    done = read_done(work_dir, writer.outputs) if work_dir.is_dir() else {}
    mine = [u for j, u in enumerate(units) if j % world == rank and unit_name(*u) not in done]

    pipe = MaskToImagePipeline.from_checkpoint(
        args.lora_ckpt, args.pretrained_model_name_or_path, num_cls=args.num_cls, device=state.device,
        dtype=resolve_dtype(args.mixed_precision), vae_tiling=args.vae_tiling, mask_encoding=args.mask_encoding,
    )  # fmt: skip
    crfm = None
    if args.mmseg_config is not None:
        from crfm.segmentation.adapter import load_segmentor

        pipe.segmentor = load_segmentor(args.mmseg_config, args.mmseg_ckpt, device=state.device, num_cls=args.num_cls)
        crfm = CRFMConfig.from_args(args)
    solver = SolverConfig.from_args(args)
    negative = negative_prompt_kwargs(args.vectors_path, args.guidance_scale)
    for sub in writer.folders:
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    shard = work_dir / SHARD_PATTERN.format(rank=rank)

    failures: list[str] = []
    traces: list[dict] = []
    start, finished, evaluations = time.perf_counter(), 0, 0
    bar = tqdm(total=len(mine), desc=f"{writer.name}[{rank}]", unit="img", disable=args.no_progress or not mine)
    for begin in range(0, len(mine), args.batch_size):
        chunk = mine[begin : begin + args.batch_size]
        batch = load_batch(chunk, args, failures)
        bar.update(len(chunk) - len(batch))  # the failed ones
        if not batch:
            continue
        out = pipe(
            torch.from_numpy(np.stack([b[3] for b in batch]).astype(np.int64)),
            torch.stack([b[4]["prompt_embeds"] for b in batch]),
            torch.stack([b[4]["pooled_prompt_embeds"] for b in batch]),
            noise_ids=[noise_id(pos, k, args.num_per_mask) for pos, _, k, _, _ in batch],
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            crfm=crfm,
            solver=solver,
            save_at=writer.save_at,
            **negative,
        )
        records = writer.write(work_dir, batch, out)
        with shard.open("a") as handle:  # after the files: an index line never lacks its files
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        traces.extend({"units": [r["unit"] for r in records], **t} for t in out.crfm_trace)
        finished += len(batch)
        evaluations += out.nfe * len(batch)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()

    summary = {
        "units": len(units),
        "done_before": len(done),
        "synthesized": finished,
        "failures": failures,
        "seconds_per_image": seconds / finished if finished else math.nan,
        "nfe_per_image": evaluations / finished if finished else math.nan,
        "solver": solver.describe(args.num_inference_steps),
        "crfm": crfm is not None,
    }
    if traces:
        with (work_dir / f"crfm_trace.rank{rank}.jsonl").open("a") as handle:
            handle.write("".join(json.dumps(t) + "\n" for t in traces))
    if state.is_main_process:
        records = merge_shards(work_dir, units, data_root, writer.outputs)
        print(
            f"[{writer.name}] {len(records)}/{len(units)} units in {work_dir} ({finished} now, {len(done)} before, "
            f"{len(failures)} failed on rank 0); {summary['seconds_per_image']:.2f} s/image, "
            f"{summary['nfe_per_image']:.1f} NFE/image ({summary['solver']}); CRFM {'on' if crfm else 'off'}"
        )
    return summary


def noise_id(position: int, variant: int, num_per_mask: int) -> int:
    """The item id a unit's noise is drawn with (with the seed): `crfm.sampling.sampler.initial_noise`."""
    return position * num_per_mask + variant


def write_panel(path: Path, image: np.ndarray, label: np.ndarray, real_path: Path, args) -> None:
    """synthesized | colourised mask | real image (resized like the mask), side by side."""
    from crfm.utils.viz import colourise_mask, distinct_palette, image_grid

    classes_file = Path(args.data_root) / CLASSES_FILE
    palette = read_classes_json(classes_file).get("palette") if classes_file.is_file() else None
    palette = palette or distinct_palette(args.num_cls)
    try:
        real = np.asarray(resize_center_crop(load_image(real_path), args.resolution, Image.Resampling.BICUBIC))
    except DatasetError:
        real = np.full_like(image, 255)
    grid = image_grid([[image, colourise_mask(label, palette), real]], titles=["synthesized", "mask", "real"])
    with atomic_path(path) as tmp:
        grid.save(tmp)


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when some items failed (each named on stderr), 0 otherwise."""
    return 1 if synthesize(args)["failures"] else 0


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
