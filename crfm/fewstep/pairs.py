"""Reflow pairs: the trained flow's (noise → clean latent) couplings, for 2-rectified flow, k-SeqRF and distillation.

    python -m crfm.reflow --pretrained_model_name_or_path ... --lora_ckpt work_dirs/train/final \
        --data_root ... --json_file index_.jsonl --vectors_path ... --num_cls 6 --work_dir work_dirs/pairs \
        --num_per_mask 8 --num_inference_steps 20 --sigma_grid uniform [--segments 4] [CRFM flags: a CRFM teacher]

It takes test.py's flags and runs test.py's loop (`crfm.sampling.synthesis.run_units`: sharded over
`accelerate launch` ranks, resumable, atomic, one error line per bad item); instead of images it keeps, per
(mask, prompt, variant) unit, the teacher's latents in safetensors shards (`pairs/<first unit>.safetensors`, one per
batch: `latents` [B, C, h, w] and, with `--segments K`, `state_<i>` at the K − 1 inner segment boundaries). The
noise is not stored: it is `initial_noise([noise_id], seed)`, redrawn exactly from the index line's `noise_id` and
`seed`. With CRFM flags the teacher is CRFM-guided, so a student trained on the pairs learns the correction.
`reflow_pairs.json` records how the pairs were made (checked when a run resumes, read by train.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from crfm.sampling.pipeline import MaskToImageOutput
from crfm.sampling.synthesis import build_parser as build_synthesis_parser
from crfm.sampling.synthesis import noise_id, run_units, sampling_settings, unit_name
from crfm.utils.errors import reading
from crfm.utils.fileio import atomic_path
from crfm.utils.flags import UsageError, entry_point, positive_int

PAIRS_META = "reflow_pairs.json"
PAIRS_FOLDER = "pairs"
PAIRS_FORMAT = "crfm-reflow-pairs/1"


def build_parser() -> argparse.ArgumentParser:
    parser = build_synthesis_parser()
    parser.prog = "python -m crfm.reflow"
    parser.description = "Reflow pairs of a trained MM-DiT: teacher latents for 2-RF / k-SeqRF / distillation."
    parser.set_defaults(work_dir="work_dirs/reflow_pairs")
    parser._option_string_actions["--work_dir"].help = "pairs folder (latent shards, index.jsonl, reflow_pairs.json)"
    parser._option_string_actions["--num_per_mask_file"].help = argparse.SUPPRESS  # refused: see check_settings
    parser.add_argument(
        "--segments",
        type=positive_int,
        default=1,
        help="also keep the teacher's latents at the K-1 inner boundaries of K equal segments of the uniform "
        "grid (k-SeqRF; needs --sigma_grid uniform and K dividing --num_inference_steps)",
    )
    return parser


def segment_indices(num_inference_steps: int, segments: int) -> tuple[int, ...]:
    """Grid indices of the inner boundaries of `segments` equal segments of the N-step uniform grid."""
    if segments < 1 or num_inference_steps % segments:
        raise UsageError(f"--segments {segments} must divide --num_inference_steps {num_inference_steps}")
    stride = num_inference_steps // segments
    return tuple(range(stride, num_inference_steps, stride))


def pairs_settings(args: argparse.Namespace) -> dict:
    """What makes two pair sets the same (a resumed run must match); train.py reads it back."""
    return {"format": PAIRS_FORMAT, **sampling_settings(args), "segments": args.segments}


class LatentWriter:
    """One safetensors file per batch (the teacher's final latents, + boundary states); an index line per unit."""

    name = "reflow"
    folders = (PAIRS_FOLDER,)
    settings_file = PAIRS_META
    what = "pairs"

    def __init__(self, args: argparse.Namespace, settings: dict) -> None:
        self.args = args
        self.settings = settings
        self.save_at = segment_indices(args.num_inference_steps, args.segments)

    def outputs(self, record: dict) -> list[str]:
        return [record["file"]]

    def write(self, work_dir: Path, batch: list, out: MaskToImageOutput) -> list[dict]:
        names = [unit_name(pos, item, k) for pos, item, k, _, _ in batch]
        relative = f"{PAIRS_FOLDER}/{names[0]}.safetensors"  # a unit is in exactly one finished batch
        tensors = {"latents": out.latents.float().cpu().contiguous()}
        tensors |= {f"state_{i}": out.states[i].float().cpu().contiguous() for i in self.save_at}
        with atomic_path(work_dir / relative) as tmp:
            save_file(tensors, str(tmp))
        return [
            {
                **item.record,
                "unit": name,
                "position": pos,
                "variant": k,
                "file": relative,
                "row": row,
                "seed": self.args.seed,
                "noise_id": noise_id(pos, k, self.args.num_per_mask),
                "nfe": out.nfe,
            }
            for row, ((pos, item, k, _, _), name) in enumerate(zip(batch, names, strict=True))
        ]


def check_settings(args: argparse.Namespace) -> dict:
    """The run's settings (`run_units` refuses a work dir holding pairs of other settings, and records them in
    `reflow_pairs.json` before the first pair)."""
    if args.num_per_mask_file is not None:  # the pairs' settings and noise ids are per --num_per_mask
        raise UsageError("--num_per_mask_file: crfm.reflow takes --num_per_mask instead (its noise ids follow it)")
    if args.segments > 1 and args.sigma_grid != "uniform":
        raise UsageError("--segments > 1 needs --sigma_grid uniform (the segment boundaries are its grid points)")
    if args.debug:
        raise UsageError("--debug writes image panels; crfm.reflow keeps latents only")
    segment_indices(args.num_inference_steps, args.segments)
    return pairs_settings(args)


def make_pairs(args: argparse.Namespace) -> dict:
    return run_units(args, LatentWriter(args, check_settings(args)))


def load_pair_latents(work_dir: str | Path, record: dict) -> dict[str, torch.Tensor]:
    """One pair's stored tensors (`latents`, `state_<i>`), from its shard row."""
    from safetensors import safe_open

    path = Path(work_dir) / record["file"]
    with reading(path, "reflow pair latents"), safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_slice(key)[record["row"] : record["row"] + 1][0] for key in handle.keys()}


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when some items failed (each named on stderr), 0 otherwise."""
    return 1 if make_pairs(args)["failures"] else 0


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
