"""Encode every prompt of a dataset index once with SD3's three text encoders.

    python preprocess/vectorize.py --pretrained_model_name_or_path sd3.5_medium \
        --data_root demo --src_json_file index.jsonl --out_json_file index_.jsonl --work_dir vectors/demo

Writes `<work_dir>/<i>.safetensors` per item, `<work_dir>/empty.safetensors` (the empty prompt, for
classifier-free guidance) and `<data_root>/<out_json_file>`: the input lines plus an `index` field.
Re-running skips items already encoded; a bad index line stops it before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from crfm.data import DatasetError  # noqa: E402
from crfm.text import DTYPES, resolve_device, vectorize_index  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="local diffusers SD3/SD3.5 folder")
    parser.add_argument("--data_root", default="demo", help="folder the index paths are relative to")
    parser.add_argument("--src_json_file", default="index.jsonl", help="input index, relative to --data_root")
    parser.add_argument("--out_json_file", default="index_.jsonl", help="output index, relative to --data_root")
    parser.add_argument("--work_dir", default="vectors", help="folder for the vector files")
    parser.add_argument("--dataset", default="", help="optional sub-folder of --work_dir (original scripts)")
    parser.add_argument("--subset", default="", help="optional sub-folder below --dataset")
    parser.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens (SD3 default 256)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16", help="encoder dtype")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or a GPU number")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per encoder call")
    parser.add_argument("--overwrite", action="store_true", help="re-encode everything")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_root = Path(args.data_root)
    vectors_dir = Path(args.work_dir, args.dataset, args.subset)
    try:
        report = vectorize_index(
            pretrained=args.pretrained_model_name_or_path,
            index_file=data_root / args.src_json_file,
            out_index=data_root / args.out_json_file,
            vectors_dir=vectors_dir,
            data_root=data_root,
            max_sequence_length=args.max_sequence_length,
            dtype=DTYPES[args.mixed_precision],
            device=resolve_device(args.device),
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"vectorized {report.items} items into {report.vectors_dir}: {report.encoded_items} encoded, "
        f"{report.skipped_items} already done; {report.encoded_prompts} distinct prompts in "
        f"{report.encode_seconds:.2f} s ({report.prompts_per_second:.1f} prompts/s); index -> {report.out_index}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
