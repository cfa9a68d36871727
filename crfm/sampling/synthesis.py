"""Dataset synthesis: label masks (+ prompts) -> new image-mask pairs, with CRFM when a segmentor is given.

The output folder is a dataset in crfm's layout: `img/`, `label/` (the conditioning masks at the output
resolution), `index.jsonl` (input lines with new paths, prompts kept) and, with `--debug`, `debug/` panels
(synthesized | colourised mask | real image). Work is split over `accelerate launch` processes (unit j goes to
process j mod P); every unit's files are written atomically before its index line, so a killed run resumes by
skipping finished units and never leaves a line without its files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from crfm.data.dataset import load_image, load_label, resize_center_crop
from crfm.data.index import CLASSES_FILE, DatasetError, IndexItem, read_classes_json, read_index
from crfm.data.vectors import load_item_vectors
from crfm.models.trained_weights import CHECKPOINT_META, CHECKPOINT_WEIGHTS, EMA_WEIGHTS, read_checkpoint_meta
from crfm.sampling.pipeline import MaskToImageOutput, MaskToImagePipeline, negative_prompt_kwargs
from crfm.sampling.rectify import CRFMConfig, attach_guide, check_guide_flags
from crfm.sampling.sampler import SolverConfig, to_uint8
from crfm.utils.base_folder import check_resolution
from crfm.utils.fileio import (
    append_records,
    atomic_path,
    folder_lock,
    read_records,
    refuse_changed_settings,
    sha256_of_files,
    write_jsonl_atomic,
    write_text_atomic,
)
from crfm.utils.flags import (
    UsageError,
    add_data_flags,
    add_model_flags,
    add_run_flags,
    add_segmentor_flags,
    entry_point,
    non_negative,
    positive_int,
    report_error,
    resolve_dtype,
)

SHARD_PATTERN = "index.rank{rank}.jsonl"
SETTINGS_FILE = "synthesis.json"  # how every image of a work dir was made
SYNTHESIS_FORMAT = "crfm-synthesis/1"
ADDED_SETTINGS = {"mask_guidance_scale": 1.0}  # what a record written before a setting existed was made with


def add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    """--guidance_scale and --mask_guidance_scale: what every sampling command offers (test.py, reflow, evaluation)."""
    add = parser.add_argument
    add("--guidance_scale", type=non_negative, default=1.0, help="classifier-free guidance (1.0: off)")
    add(
        "--mask_guidance_scale", type=non_negative, default=1.0,
        help="guidance away from the null mask (1.0: off); needs a checkpoint trained with --mask_dropout; not with "
        "--guidance_scale",
    )  # fmt: skip


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
    add(
        "--num_inference_steps", type=positive_int, default=28, help="sampling steps (the paper: 23; rk45: CRFM's grid)"
    )
    add_guidance_flags(parser)
    add("--resolution", type=positive_int, default=512, help="output side, px (masks resized + centre-cropped)")
    add("--batch_size", type=positive_int, default=1, help="images per sampler call")
    add("--num_per_mask", type=positive_int, default=1, help="variants per mask (different seeds)")
    add(
        "--num_per_mask_file",
        default=None,
        help='JSON {"counts": {mask path as in the index: variants}} (crfm.segmentation.hardness\'s --out): '
        "variants per mask, instead of --num_per_mask",
    )
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
    """Finished units from every rank's shard: name -> output record (only those whose `outputs` files exist; a
    line cut by a kill or a full disk is dropped by `read_records`, so its unit is made again)."""
    done: dict[str, dict] = {}
    for shard in sorted(work_dir.glob(SHARD_PATTERN.format(rank="*"))):
        for record in read_records(shard):
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
    returns one index record per unit (with its "unit" name); `outputs` lists a record's files. `settings` (what
    every unit is made with) go to `settings_file` before the first unit; a work dir holding units made with other
    settings is refused, naming what it holds (`what`)."""

    name: str
    save_at: tuple[int, ...]
    folders: tuple[str, ...]
    settings: dict
    settings_file: str
    what: str

    def write(self, work_dir: Path, batch: list, out: MaskToImageOutput) -> list[dict]: ...

    def outputs(self, record: dict) -> list[str]: ...


def checkpoint_digest(ckpt: str | Path) -> str | None:
    """The trained weights' identity: a digest of the checkpoint's weight files and record (a copied checkpoint is
    the same, a retrained one is not); None where there is no such folder (the loader names it)."""
    files = [Path(ckpt) / name for name in (CHECKPOINT_META, CHECKPOINT_WEIGHTS, EMA_WEIGHTS)]
    return sha256_of_files([f for f in files if f.is_file()]) if Path(ckpt).is_dir() else None


def sampling_settings(args: argparse.Namespace) -> dict:
    """What makes two sets of units the same (test.py's `synthesis.json`, crfm.reflow's `reflow_pairs.json`)."""
    crfm = CRFMConfig.from_args(args).record() if args.mmseg_config is not None else None
    return {
        "checkpoint": str(Path(args.lora_ckpt).resolve()),
        "base_model": str(Path(args.pretrained_model_name_or_path).resolve()),
        "data_root": str(Path(args.data_root).resolve()),
        "json_file": args.json_file,
        "vectors_path": str(Path(args.vectors_path).resolve()),
        "num_cls": args.num_cls,
        "resolution": args.resolution,
        "seed": args.seed,
        "num_per_mask": args.num_per_mask,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "mask_guidance_scale": args.mask_guidance_scale,
        "solver": SolverConfig.from_args(args).__dict__,
        "crfm": crfm,
        "segmentor": None if crfm is None else str(Path(args.mmseg_ckpt).resolve()),
    }


def synthesis_settings(args: argparse.Namespace) -> dict:
    """test.py's record: `sampling_settings`, the checkpoint's content, the counts file's and what else changes a
    pixel (compute dtype, tiled decoding, the mask encoding asked for)."""
    counts = args.num_per_mask_file
    return {
        "format": SYNTHESIS_FORMAT,
        **sampling_settings(args),
        "checkpoint_sha256": checkpoint_digest(args.lora_ckpt),
        "num_per_mask_file": None if counts is None else sha256_of_files([Path(counts)]),
        "mask_encoding": args.mask_encoding,
        "mixed_precision": str(resolve_dtype(args.mixed_precision)).removeprefix("torch."),
        "vae_tiling": args.vae_tiling,
    }


class ImageWriter:
    """test.py's output: one image and its mask (+ a debug panel) per unit, a dataset index line each."""

    name = "synthesize"
    save_at: tuple[int, ...] = ()
    settings_file = SETTINGS_FILE
    what = "synthesized images"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.folders = ("img", "label", *(("debug",) if args.debug else ()))
        if args.num_per_mask_file is not None and not Path(args.num_per_mask_file).is_file():
            raise UsageError(f"--num_per_mask_file: no such file: {args.num_per_mask_file}")
        self.settings = synthesis_settings(args)

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


Unit = tuple[int, IndexItem, int]  # (position in the index, item, variant)


@dataclass
class UnitPlan:
    """Which units a run makes: all of them in order, their noise-id stride, those finished before, this process's
    share of the rest."""

    units: list[Unit]
    stride: int
    done: dict[str, dict]
    mine: list[Unit]


@dataclass
class Sampler:
    """What samples a batch: the pipeline (with the CRFM guide attached when one is given) and the settings of the
    call."""

    pipe: MaskToImagePipeline
    crfm: CRFMConfig | None
    solver: SolverConfig
    negative: dict[str, torch.Tensor]


@dataclass
class LoopReport:
    finished: int = 0
    evaluations: int = 0  # velocity evaluations, summed over images
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    traces: list[dict] = field(default_factory=list)  # CRFM's passes, per batch


def plan_run(args: argparse.Namespace, writer: UnitWriter, rank: int, world: int) -> UnitPlan:
    """Plan: every unit of the index, and this process's share (unit j on process j mod world) not finished yet."""
    data_root, work_dir = Path(args.data_root), Path(args.work_dir)
    items = read_index(data_root / args.json_file, data_root)
    units, stride = plan_units(args, items)
    done = read_done(work_dir, writer.outputs) if work_dir.is_dir() else {}
    mine = [u for j, u in enumerate(units) if j % world == rank and unit_name(*u) not in done]
    return UnitPlan(units, stride, done, mine)


def check_mask_guidance(args: argparse.Namespace) -> None:
    """Refuse mask guidance beside text guidance, or with a checkpoint whose null-mask branch was never trained."""
    if args.mask_guidance_scale <= 1.0:
        return
    if args.guidance_scale > 1.0:
        raise UsageError("--mask_guidance_scale and --guidance_scale: one guidance at a time")
    if not read_checkpoint_meta(args.lora_ckpt).get("mask_dropout"):
        raise UsageError(
            f"--mask_guidance_scale: {args.lora_ckpt} was trained without --mask_dropout, so it has never seen the "
            "null mask that guidance compares against; fine-tune with train.py --mask_dropout 0.1"
        )


def load_sampler(args: argparse.Namespace, device: torch.device) -> Sampler:
    """Load: the trained MM-DiT on its base, the CRFM guide, the solver and the guidance's empty prompt."""
    pipe = MaskToImagePipeline.from_checkpoint(
        args.lora_ckpt, args.pretrained_model_name_or_path, num_cls=args.num_cls, device=device,
        dtype=resolve_dtype(args.mixed_precision), vae_tiling=args.vae_tiling, mask_encoding=args.mask_encoding,
    )  # fmt: skip
    crfm = attach_guide(pipe, args, device)
    negative = negative_prompt_kwargs(args.vectors_path, args.guidance_scale)
    return Sampler(pipe, crfm, SolverConfig.from_args(args), negative)


def write_batch(work_dir: Path, shard: Path, writer: UnitWriter, batch: list, out: MaskToImageOutput) -> list[dict]:
    """Write: the batch's files (atomically, by `writer`), then their index lines: a line never lacks its files."""
    records = writer.write(work_dir, batch, out)
    append_records(shard, records)
    return records


def sample_units(
    args: argparse.Namespace, writer: UnitWriter, plan: UnitPlan, sampler: Sampler, rank: int
) -> LoopReport:
    """Loop: this process's units batch by batch; a bad item is reported and left out, the rest go on."""
    from tqdm.auto import tqdm

    work_dir = Path(args.work_dir)
    shard = work_dir / SHARD_PATTERN.format(rank=rank)
    report, start = LoopReport(), time.perf_counter()
    mine = plan.mine
    bar = tqdm(total=len(mine), desc=f"{writer.name}[{rank}]", unit="img", disable=args.no_progress or not mine)
    for begin in range(0, len(mine), args.batch_size):
        chunk = mine[begin : begin + args.batch_size]
        batch = load_batch(chunk, args, report.failures)
        bar.update(len(chunk) - len(batch))  # the failed ones
        if not batch:
            continue
        out = sampler.pipe(
            torch.from_numpy(np.stack([b[3] for b in batch]).astype(np.int64)),
            torch.stack([b[4]["prompt_embeds"] for b in batch]),
            torch.stack([b[4]["pooled_prompt_embeds"] for b in batch]),
            noise_ids=[noise_id(pos, k, plan.stride) for pos, _, k, _, _ in batch],
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            mask_guidance_scale=args.mask_guidance_scale,
            crfm=sampler.crfm,
            solver=sampler.solver,
            save_at=writer.save_at,
            **sampler.negative,
        )
        records = write_batch(work_dir, shard, writer, batch, out)
        report.traces.extend({"units": [r["unit"] for r in records], **t} for t in out.crfm_trace)
        report.finished += len(batch)
        report.evaluations += out.nfe * len(batch)
        bar.update(len(batch))
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def refuse_other_settings(work_dir: Path, writer: UnitWriter) -> bool:
    """A work dir holding units made with other settings than `writer.settings` is refused in one line naming each
    changed key; returns whether it holds a record."""
    fix = "use another --work_dir, or the flags it was made with"
    return refuse_changed_settings(work_dir / writer.settings_file, writer.settings, writer.what, fix, ADDED_SETTINGS)


@contextlib.contextmanager
def claim_work_dir(work_dir: Path, writer: UnitWriter, state) -> Iterator[None]:
    """Hold the work dir for this run: the main process takes its lock (a second live run is refused, a dead one's
    lock taken over), checks the settings again under it (a run may have finished there meanwhile) and records
    them before any unit is written; every process refuses alike."""
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        refusal = None
        if state.is_main_process:
            try:
                stack.enter_context(folder_lock(work_dir))
                if not refuse_other_settings(work_dir, writer):
                    write_text_atomic(work_dir / writer.settings_file, json.dumps(writer.settings, indent=2) + "\n")
            except UsageError as exc:
                refusal = str(exc)
        refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise UsageError(refusal)
        yield


def run_units(args: argparse.Namespace, writer: UnitWriter) -> dict:
    """Sample every (mask, variant) unit of the index not finished yet (this process's share) and keep what
    `writer` keeps; returns a summary. The one sampling loop of test.py and crfm.reflow: check (flags, settings,
    index: before any model loads or anything is written), load, claim the work dir, loop (each batch written as
    it is done), then the main process merges every process's index lines."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    work_dir = Path(args.work_dir)
    check_guide_flags(args)
    check_mask_guidance(args)
    check_resolution(args.pretrained_model_name_or_path, args.resolution)
    refuse_other_settings(work_dir, writer)
    plan = plan_run(args, writer, rank, world)  # bad index lines and counts named before the model loads
    sampler = load_sampler(args, state.device)
    with claim_work_dir(work_dir, writer, state):
        plan = plan_run(args, writer, rank, world)  # under the lock: what a run before this one finished
        for sub in writer.folders:
            (work_dir / sub).mkdir(parents=True, exist_ok=True)
        loop = sample_units(args, writer, plan, sampler, rank)
        state.wait_for_everyone()
        if loop.traces:
            append_records(work_dir / f"crfm_trace.rank{rank}.jsonl", loop.traces)
        records = (
            merge_shards(work_dir, plan.units, Path(args.data_root), writer.outputs) if state.is_main_process else []
        )

    finished = loop.finished
    summary = {
        "units": len(plan.units),
        "done_before": len(plan.done),
        "synthesized": finished,
        "failures": loop.failures,
        "seconds_per_image": loop.seconds / finished if finished else math.nan,
        "nfe_per_image": loop.evaluations / finished if finished else math.nan,
        "solver": sampler.solver.describe(args.num_inference_steps),
        "crfm": sampler.crfm is not None,
    }
    if state.is_main_process:
        rate = (
            f"{loop.seconds / finished:.2f} s/image, {loop.evaluations / finished:.1f} NFE/image " if finished else ""
        )  # nothing sampled: no rate
        print(
            f"[{writer.name}] {len(records)}/{len(plan.units)} units in {work_dir} ({finished} now, "
            f"{len(plan.done)} before, {len(loop.failures)} failed on rank 0); {rate}({summary['solver']}); "
            f"CRFM {'on' if sampler.crfm else 'off'}; {resolve_dtype(args.mixed_precision)} on {state.device}"
        )
    return summary


def read_mask_counts(path: str | Path, items: list[IndexItem]) -> tuple[list[int], int]:
    """Variants per item from a counts file (`{"counts": {mask path as in the index: count >= 0}}`, as
    `crfm.segmentation.hardness` writes it), and the largest count in the file (the noise stride)."""
    where = f"--num_per_mask_file {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    counts = data.get("counts") if isinstance(data, dict) else None
    if not isinstance(counts, dict) or not counts:
        raise UsageError(f"{where}: expected an object with a non-empty 'counts' object (mask path -> count)")
    bad = [key for key, n in counts.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:
        raise UsageError(f"{where}: counts must be integers >= 0, not {counts[bad[0]]!r} for {bad[0]}")
    missing = [item for item in items if item.source not in counts]
    if missing:
        more = f" (and {len(missing) - 1} more masks)" if len(missing) > 1 else ""
        raise UsageError(f"{where} has no count for mask {missing[0].source} ({missing[0].where()}){more}")
    return [counts[item.source] for item in items], max(counts.values())


def plan_units(args: argparse.Namespace, items: list[IndexItem]) -> tuple[list[tuple[int, IndexItem, int]], int]:
    """Every (position, item, variant) unit of the run, and the stride of their noise ids (`noise_id`):
    `--num_per_mask` variants per mask and stride, or `--num_per_mask_file`'s counts with its largest count."""
    if args.num_per_mask_file is None:
        counts, stride = [args.num_per_mask] * len(items), args.num_per_mask
    else:
        counts, stride = read_mask_counts(args.num_per_mask_file, items)
    return [(pos, item, k) for pos, item in enumerate(items) for k in range(counts[pos])], stride


def noise_id(position: int, variant: int, stride: int) -> int:
    """The item id a unit's noise is drawn with (with the seed): `crfm.sampling.sampler.initial_noise`.

    `stride` is --num_per_mask, or with --num_per_mask_file the file's largest count, so ids never collide; and a
    run with a counts file whose largest count is N gives variant k of a mask exactly the noise (hence, with the
    same seed and settings, the image) it has in a uniform run with --num_per_mask N.
    """
    return position * stride + variant


def write_panel(path: Path, image: np.ndarray, label: np.ndarray, real_path: Path, args) -> None:
    """synthesized | colourised mask | real image (resized like the mask), side by side."""
    from crfm.models.conditioning import class_palette
    from crfm.utils.viz import colourise_mask, image_grid

    classes_file = Path(args.data_root) / CLASSES_FILE
    palette = read_classes_json(classes_file).get("palette") if classes_file.is_file() else None
    palette = palette or class_palette(args.num_cls)  # the palette mask encoding's colours
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
