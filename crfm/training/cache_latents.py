"""Encode every image (and VAE-encoded mask) of a training index once with the base's VAE, for
`train.py --latents_path`: training then loads no VAE and spends no step encoding.

    python -m crfm.training.cache_latents --pretrained_model_name_or_path sd3.5_medium --data_root data/loveda \
        --json_file train_.jsonl --num_cls 7 --mask_encoding grey --resolution 512 --flip_prob 0.5 \
        --work_dir latents/loveda_512
    accelerate launch -m crfm.training.cache_latents ...   (items split over the processes: item j on process j mod P)

Pass train.py's --resolution, --mask_encoding, --num_cls and --flip_prob (> 0 also stores the flipped pairs).
What is stored and why: `crfm.data.latents`. The VAE runs in float32, as in training. Like vectorize it is
resumable (each file written atomically, a re-run skips items whose file holds the same image and label) and
refuses to add to a folder made with other settings; a bad item (unreadable file, class id >= num_cls, image and
label of different sizes) is reported on one `error:` line and the rest goes on (exit status 1 then).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crfm.data.dataset import PairDataset
from crfm.data.index import DatasetError, read_index
from crfm.data.latents import (
    FLIPPED,
    LATENT_KEY,
    MANIFEST_FILE,
    MASK_KEY,
    cache_settings,
    item_latent_path,
    item_signature,
    save_item_latents,
    stored_keys,
    stored_signature,
)
from crfm.data.vectorize import OVERWRITE_HINT
from crfm.models.conditioning import encode_mask_condition
from crfm.utils.fileio import refuse_changed_settings, remove_stale_temporaries, write_text_atomic
from crfm.utils.flags import (
    add_data_flags,
    add_model_flags,
    add_pair_flags,
    add_run_flags,
    entry_point,
    positive_int,
    report_error,
    resolve_device,
)


@dataclass
class CacheReport:
    items: int
    encoded: int  # this process's items encoded in this run
    skipped: int  # this process's items found done
    failures: list[str]
    encode_seconds: float  # this process: loading, encoding and writing its pending items
    latents_dir: Path

    @property
    def seconds_per_item(self) -> float:
        return self.encode_seconds / self.encoded if self.encoded else float("nan")


@torch.no_grad()
def encode_items(vae, pixels: torch.Tensor, labels: torch.Tensor, num_cls: int, encoding: str, flips: bool) -> dict:
    """A batch of images [B, 3, H, W] in [-1, 1] and labels [B, H, W] -> the stored tensors (batch first)."""
    out = {}
    for suffix, flip in (("", False), (FLIPPED, True)) if flips else (("", False),):
        image, label = (pixels.flip(-1), labels.flip(-1)) if flip else (pixels, labels)
        out[LATENT_KEY + suffix] = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.parameters.float()
        out[MASK_KEY + suffix] = encode_mask_condition(vae, label, num_cls, encoding).float()
    return out


def cache_latents(args: argparse.Namespace) -> CacheReport:
    """Encode this process's share of the index's pending items into `args.work_dir`."""
    from accelerate import PartialState
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from crfm.utils.base_folder import check_base_folder, check_resolution

    state = PartialState(cpu=not torch.cuda.is_available())
    check_base_folder(args.pretrained_model_name_or_path, ("vae",))
    check_resolution(args.pretrained_model_name_or_path, args.resolution)  # before latents.json is written
    data_root, latents_dir = Path(args.data_root), Path(args.work_dir)
    items = read_index(data_root / args.json_file, data_root)
    flips = args.flip_prob > 0
    settings = cache_settings(
        args.pretrained_model_name_or_path, args.resolution, args.mask_encoding, args.num_cls, flips
    )
    # Every process checks (so all refuse alike); the main one records, before any file is written.
    if not args.overwrite:
        refuse_changed_settings(latents_dir / MANIFEST_FILE, settings, "latents", OVERWRITE_HINT, error=DatasetError)
    if state.is_main_process:
        remove_stale_temporaries(latents_dir)
        write_text_atomic(latents_dir / MANIFEST_FILE, json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()

    keys, failures = stored_keys(flips), []
    pending, skipped = [], 0
    for position, item in enumerate(items):
        if position % state.num_processes != state.process_index:
            continue
        try:
            signature = item_signature(data_root, item)
        except OSError as exc:  # read_index saw the files; they may still be unreadable or gone
            failures.append(f"{item.where()}: cannot read {exc.filename}: {exc.strerror}")
            report_error(failures[-1])
            continue
        if not args.overwrite and stored_signature(item_latent_path(latents_dir, position), keys) == signature:
            skipped += 1
        else:
            pending.append((position, item, signature))

    start, encoded = time.perf_counter(), 0
    if pending:
        # float32, as train.py runs it: the SD3 VAE is unstable in half precision, and the cache must be its encode.
        device = resolve_device(args.device) if args.device != "auto" else state.device
        vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", dtype=torch.float32)
        vae = vae.requires_grad_(False).eval().to(device)
        dataset = PairDataset([item for _, item, _ in pending], data_root, args.resolution, num_cls=args.num_cls)
        bar = tqdm(total=len(pending), desc=f"cache_latents[{state.process_index}]", disable=args.no_progress)
        for begin in range(0, len(pending), args.batch_size):
            chunk, batch = pending[begin : begin + args.batch_size], []
            for offset, (position, _, signature) in enumerate(chunk, start=begin):
                try:
                    batch.append((position, signature, dataset[offset]))
                except DatasetError as exc:  # PairDataset's message names the item (index line, image)
                    failures.append(str(exc))
                    report_error(failures[-1])
            bar.update(len(chunk) - len(batch))
            if not batch:
                continue
            pixels = torch.stack([sample["image"] for _, _, sample in batch])
            labels = torch.stack([sample["label"] for _, _, sample in batch])
            tensors = encode_items(vae, pixels, labels, args.num_cls, args.mask_encoding, flips)
            for row, (position, signature, _) in enumerate(batch):
                item_tensors = {key: tensors[key][row] for key in keys}
                save_item_latents(item_latent_path(latents_dir, position), item_tensors, signature)
            encoded += len(batch)
            bar.update(len(batch))
        bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    return CacheReport(len(items), encoded, skipped, failures, seconds, latents_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crfm.training.cache_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(parser, mask_encoding=True)
    add_data_flags(parser, "index_.jsonl", "training index (train.py's --json_file)")
    add_pair_flags(parser)
    parser.add_argument("--work_dir", default="latents", help="folder for the latent files (train.py --latents_path)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per VAE call")
    parser.add_argument("--overwrite", action="store_true", help="re-encode everything")
    add_run_flags(parser, seed_help=None, device=True)
    return parser


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when some items failed (each named on stderr), 0 otherwise."""
    report = cache_latents(args)
    print(
        f"cached latents of {report.items} items in {report.latents_dir}: {report.encoded} encoded here "
        f"({report.seconds_per_item:.3f} s/item), {report.skipped} already done, {len(report.failures)} failed"
    )
    return 1 if report.failures else 0


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
