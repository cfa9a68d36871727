"""The one definition of crfm's shared command-line flags, and the one way entry points report errors.

Every entry point builds its parser from these groups, so a flag means the same thing everywhere:

- model: `--pretrained_model_name_or_path` (the base SD3/SD3.5 folder), `--lora_ckpt` (a trained checkpoint),
  `--mask_encoding` (how masks reach the mask branch: chosen when training, checked against the checkpoint when
  sampling);
- data: `--data_root`, `--json_file` (aliases `--train_file`, `--src_json_file`: the index to read, relative to
  `--data_root`), `--vectors_path`, `--num_cls`;
- run: `--seed`, `--device`, `--mixed_precision`, `--no_progress`;
- segmentor: `--mmseg_config`, `--mmseg_ckpt`.

Names are snake_case; the hyphenated spellings some tools had are kept as aliases. `run_cli` turns the expected
failures of a run (bad data, missing files, wrong settings) into one `error: ...` line on stderr and exit status 2,
the status argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from crfm.models.conditioning import DEFAULT_MASK_ENCODING, MASK_ENCODINGS

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
INDEX_FLAG_ALIASES = ("--train_file", "--src_json_file")  # the original scripts' names for the input index


class UsageError(ValueError):
    """A combination of flags or inputs that cannot work, found after parsing; reported as one line, exit 2."""


def resolve_device(device: str | int | None) -> torch.device:
    """`--device`: 'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N', or the original scripts' GPU number."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) or str(device).isdigit():
        return torch.device(f"cuda:{int(device)}")
    try:
        return torch.device(device)
    except RuntimeError as exc:  # torch's message for e.g. 'gpu0' names the accepted device types
        raise UsageError(f"--device {device!r}: {exc}") from exc


def resolve_dtype(mixed_precision: str | None) -> torch.dtype:
    """`--mixed_precision`: given, it wins; unset, what `accelerate launch` was configured with, else fp32."""
    if mixed_precision is None:
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision not in DTYPES:
        raise UsageError(f"mixed precision {mixed_precision!r} is not one of {sorted(DTYPES)}")
    return DTYPES[mixed_precision]


def add_model_flags(parser: argparse.ArgumentParser, checkpoint: bool = False, mask_encoding: bool = False) -> None:
    """`checkpoint`: the command reads a trained checkpoint (`--lora_ckpt`); then `--mask_encoding` (with
    `mask_encoding`) defaults to the checkpoint's and, when given, must match it. Without a checkpoint it is the
    encoding to train with."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path", required=True, help="local diffusers SD3/SD3.5 folder (the base model)"
    )
    if checkpoint:
        group.add_argument(
            "--lora_ckpt", required=True, help="trained checkpoint folder (train.py's final/ or a checkpoint-N/)"
        )
    if mask_encoding and checkpoint:
        group.add_argument(
            "--mask_encoding",
            choices=MASK_ENCODINGS,
            default=None,
            help="mask encoding; default: the checkpoint's, and if given it must be the checkpoint's",
        )
    elif mask_encoding:
        group.add_argument(
            "--mask_encoding",
            choices=MASK_ENCODINGS,
            default=DEFAULT_MASK_ENCODING,
            help="mask as the mask branch sees it: a grey (the paper's) or palette image through the VAE, or "
            "onehot class fractions per latent cell",
        )


def add_data_flags(
    parser: argparse.ArgumentParser,
    index_default: str,
    index_help: str,
    vectors: bool = False,
    num_cls: str = "required",
    data_root_help: str = "dataset folder; index paths are relative to it",
    data_root_default: str | None = None,
) -> None:
    """`num_cls`: 'required', 'optional' (checked against classes.json when given) or 'none'."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data_root", required=data_root_default is None, default=data_root_default, help=data_root_help
    )
    group.add_argument(
        "--json_file",
        *INDEX_FLAG_ALIASES,
        dest="json_file",
        default=index_default,
        help=f"{index_help}, relative to --data_root",
    )
    if vectors:
        group.add_argument(
            "--vectors_path", required=True, help="folder of prompt vectors (preprocess/vectorize.py's --work_dir)"
        )
    if num_cls != "none":
        group.add_argument(
            "--num_cls",
            type=int,
            required=num_cls == "required",
            help="number of classes (mask ids 0..num_cls-1, 255 = ignore)",
        )


def add_run_flags(
    parser: argparse.ArgumentParser,
    seed_help: str | None = "seed of every random draw",
    seed_default: int | None = 0,
    device: bool = False,
    mixed_precision: bool = False,
) -> None:
    """`seed_help=None`: the command draws nothing at random and has no --seed."""
    group = parser.add_argument_group("run")
    if seed_help is not None:
        group.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    if device:
        group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N or a GPU number")
    if mixed_precision:
        group.add_argument(
            "--mixed_precision",
            choices=MIXED_PRECISION_CHOICES,
            default=None,
            help="compute dtype; default: the `accelerate launch` config's, else no (fp32)",
        )
    group.add_argument("--no_progress", action="store_true", help="no progress bars (logs, CI)")


def add_segmentor_flags(parser: argparse.ArgumentParser, required: bool, purpose: str) -> None:
    group = parser.add_argument_group("segmentor (mmseg)")
    group.add_argument("--mmseg_config", required=required, default=None, help=f"mmseg config {purpose}")
    group.add_argument(
        "--mmseg_ckpt", required=required, default=None, help="segmentor weights (weights-only .pth or .safetensors)"
    )


def one_line(error: BaseException | str) -> str:
    """An error message on one line (multi-line messages, e.g. lists of bad index lines, joined with '; ')."""
    parts = [part.strip() for part in str(error).splitlines() if part.strip()]
    return "; ".join(parts) or type(error).__name__


def report_error(error: BaseException | str) -> int:
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


def run_cli(
    parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], object], argv: list[str] | None
) -> int:
    """Parse `argv`, run `body(args)`; expected failures become one stderr line and exit status 2.

    `body` returns its exit status, or anything else (None, a summary) for success.
    """
    args = parser.parse_args(argv)
    try:
        status = body(args)
    except (ValueError, OSError) as exc:  # DatasetError and UsageError are ValueErrors; missing files OSErrors
        return report_error(exc)
    return status if isinstance(status, int) else 0


def entry_point(
    build_parser: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], object]
) -> Callable[[list[str] | None], int]:
    """`main(argv=None) -> exit status` of a command: its parser and `body` run through `run_cli`."""

    def main(argv: list[str] | None = None) -> int:
        return run_cli(build_parser(), body, argv)

    main.__doc__ = f"Command line of `{body.__module__}` (see its build_parser)."
    return main
