"""Encode every prompt of a dataset index once with SD3's three text encoders (paper stage (a), pre-processing).

Prompts are encoded exactly as diffusers' `StableDiffusion3Pipeline.encode_prompt` does (we call it): CLIP-L and
CLIP-G penultimate hidden states concatenated and zero-padded to the T5 width, T5 tokens appended along the
sequence; pooled = both CLIP projections. The vectors go to the store described in `crfm.data.vectors`.

    python preprocess/vectorize.py --pretrained_model_name_or_path sd3.5_medium \
        --data_root demo --src_json_file index.jsonl --out_json_file index_.jsonl --work_dir vectors/demo

Writes `<work_dir>/<i>.safetensors` per item, `<work_dir>/empty.safetensors` (the empty prompt, for
classifier-free guidance) and `<data_root>/<out_json_file>`: the input lines plus an `index` field.
Re-running skips items already encoded; a bad index line stops it before anything is written.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from crfm.data.index import (
    DatasetError,
    read_index,
)
from crfm.data.vectors import EMPTY_PROMPT_FILE, SETTINGS_FILE, item_vector_path, save_vectors, stored_prompt
from crfm.utils.fileio import (
    refuse_changed_settings,
    remove_stale_temporaries,
    write_jsonl_atomic,
    write_text_atomic,
)
from crfm.utils.flags import (
    add_data_flags,
    add_model_flags,
    add_run_flags,
    entry_point,
    positive_int,
    resolve_device,
    resolve_dtype,
)


def load_text_encoders(pretrained: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the pipeline's tokenizers and text encoders only (no transformer or VAE weights).

    Returns a `StableDiffusion3Pipeline` so that `encode_prompt` is diffusers' own code.
    """
    from crfm.utils.base_folder import check_base_folder
    from crfm.utils.quiet import sd3_pipeline_module

    StableDiffusion3Pipeline = sd3_pipeline_module().StableDiffusion3Pipeline
    text_parts = [f"{kind}{suffix}" for suffix in ("", "_2", "_3") for kind in ("text_encoder", "tokenizer")]
    pretrained = check_base_folder(pretrained, text_parts)
    components = json.loads((pretrained / "model_index.json").read_text())
    # Components saved as null (e.g. SD3 without T5) must be passed as None explicitly to diffusers.
    skipped: dict = {name: None for name, spec in components.items() if isinstance(spec, list) and spec[0] is None}
    skipped["vae"] = None
    # Without T5, diffusers sizes the zero T5 block from the transformer config, so keep it then.
    if "text_encoder_3" not in skipped:
        skipped["transformer"] = None
    pipe = StableDiffusion3Pipeline.from_pretrained(pretrained, dtype=dtype, **skipped)
    return pipe.to(device)


@torch.no_grad()
def encode_prompts(
    pipe, prompts: Sequence[str], max_sequence_length: int = 256, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-encode prompts with diffusers' `encode_prompt`; returns ([B, seq, dim], [B, pooled_dim])."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts),
        prompt_2=None,
        prompt_3=None,
        device=torch.device(device) if device is not None else pipe.text_encoder.device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled


OVERWRITE_HINT = "use another --work_dir, or --overwrite to re-encode everything"


@dataclass
class VectorizeReport:
    items: int
    encoded_items: int
    skipped_items: int
    encoded_prompts: int  # distinct prompts sent through the encoders
    seconds: float  # whole call, model loading included
    encode_seconds: float  # encoding and writing only
    out_index: Path
    vectors_dir: Path

    @property
    def prompts_per_second(self) -> float:
        return self.encoded_prompts / self.encode_seconds if self.encode_seconds > 0 else float("nan")


def vectorize_index(
    pretrained: str | Path,
    index_file: str | Path,
    out_index: str | Path,
    vectors_dir: str | Path,
    data_root: str | Path | None = None,
    max_sequence_length: int = 256,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> VectorizeReport:
    """Encode every prompt of an index into per-item safetensors; resumable and validating.

    The whole index is validated first (nothing is written on a bad line). Items whose file already
    holds vectors of the same prompt are skipped, so a killed run resumes where it stopped.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    items = read_index(index_file, data_root)
    vectors_dir = Path(vectors_dir)
    settings = {
        "pretrained_model_name_or_path": str(Path(pretrained).resolve()),
        "max_sequence_length": max_sequence_length,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if not overwrite:
        refuse_changed_settings(vectors_dir / SETTINGS_FILE, settings, "vectors", OVERWRITE_HINT, error=DatasetError)
    remove_stale_temporaries(vectors_dir)
    # Recorded before any vector is written, so files in this folder always match these settings.
    write_text_atomic(vectors_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")

    empty_path = vectors_dir / EMPTY_PROMPT_FILE
    pending: dict[str, list[int]] = {}  # prompt -> positions still to write
    for position, item in enumerate(items):
        path = item_vector_path(vectors_dir, position)
        if overwrite or stored_prompt(path) != item.prompt:
            pending.setdefault(item.prompt, []).append(position)
    if overwrite or stored_prompt(empty_path) != "":
        pending.setdefault("", []).append(-1)  # -1: the empty-prompt file

    encoded_items = sum(len(v) for v in pending.values()) - (1 if -1 in pending.get("", []) else 0)
    encode_seconds = 0.0
    if pending:
        pipe = load_text_encoders(pretrained, dtype=dtype, device=device)
        encode_start = time.perf_counter()
        prompts = list(pending)
        bar = tqdm(total=len(prompts), desc="vectorize", unit="prompt", disable=not progress)
        for begin in range(0, len(prompts), batch_size):
            batch = prompts[begin : begin + batch_size]
            embeds, pooled = encode_prompts(pipe, batch, max_sequence_length, device)
            for prompt, embed_row, pooled_row in zip(batch, embeds, pooled, strict=True):
                for position in pending[prompt]:
                    path = empty_path if position == -1 else item_vector_path(vectors_dir, position)
                    save_vectors(path, embed_row, pooled_row, prompt)
            bar.update(len(batch))
        bar.close()
        encode_seconds = time.perf_counter() - encode_start
        del pipe

    write_jsonl_atomic(out_index, ({**item.record, "index": pos} for pos, item in enumerate(items)))
    return VectorizeReport(
        items=len(items),
        encoded_items=encoded_items,
        skipped_items=len(items) - encoded_items,
        encoded_prompts=len(pending),
        seconds=time.perf_counter() - start,
        encode_seconds=encode_seconds,
        out_index=Path(out_index),
        vectors_dir=vectors_dir,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess/vectorize.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(parser)
    add_data_flags(parser, "index.jsonl", "input index", num_cls="none", data_root_default="demo")
    parser.add_argument("--out_json_file", default="index_.jsonl", help="output index, relative to --data_root")
    parser.add_argument("--work_dir", default="vectors", help="folder for the vector files")
    parser.add_argument("--dataset", default="", help="optional sub-folder of --work_dir (original scripts)")
    parser.add_argument("--subset", default="", help="optional sub-folder below --dataset")
    parser.add_argument("--max_sequence_length", type=positive_int, default=256, help="T5 tokens (SD3 default 256)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="prompts per encoder call")
    parser.add_argument("--overwrite", action="store_true", help="re-encode everything")
    add_run_flags(parser, seed_help=None, device=True, mixed_precision=True)
    return parser


def run(args: argparse.Namespace) -> int:
    data_root = Path(args.data_root)
    report = vectorize_index(
        pretrained=args.pretrained_model_name_or_path,
        index_file=data_root / args.json_file,
        out_index=data_root / args.out_json_file,
        vectors_dir=Path(args.work_dir, args.dataset, args.subset),
        data_root=data_root,
        max_sequence_length=args.max_sequence_length,
        dtype=resolve_dtype(args.mixed_precision),
        device=resolve_device(args.device),
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"vectorized {report.items} items into {report.vectors_dir}: {report.encoded_items} encoded, "
        f"{report.skipped_items} already done; {report.encoded_prompts} distinct prompts in "
        f"{report.encode_seconds:.2f} s ({report.prompts_per_second:.1f} prompts/s); index -> {report.out_index}"
    )
    return 0


main = entry_point(build_parser, run)


if __name__ == "__main__":
    raise SystemExit(main())
