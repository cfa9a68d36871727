"""The one definition of crfm's shared command-line flags, and the one way entry points report errors.

Every entry point builds its parser from these groups, so a flag means the same thing everywhere:

- model: `--pretrained_model_name_or_path` (the base SD3/SD3.5 folder), `--lora_ckpt` (a trained checkpoint),
  `--mask_encoding` (how masks reach the mask branch: chosen when training, checked against the checkpoint when
  sampling);
- data: `--data_root`, `--json_file` (aliases `--train_file`, `--src_json_file`: the index to read, relative to
  `--data_root`), `--vectors_path`, `--num_cls`;
- pairs: `--resolution`, `--flip_prob` (training, and the latent cache that must match it);
- run: `--seed`, `--device`, `--mixed_precision`, `--no_progress`;
- segmentor: `--mmseg_config`, `--mmseg_ckpt`.

Names are snake_case; the hyphenated spellings some tools had are kept as aliases. A settings dataclass makes its
own flags from its fields (`option`, `add_settings_flags`, `settings_from_args`), with choices from its constants.
Numbers are checked against their range when parsed (`bounded`), before any folder is made. `run_cli` turns a bad
flag and the expected failures of a run (bad data, missing files, wrong settings) into one `error: ...` line on
stderr and exit status 2, the status argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from crfm.utils.constants import DEFAULT_MASK_ENCODING, MASK_ENCODINGS
from crfm.utils.errors import UsageError, report_error
from crfm.utils.errors import one_line as one_line  # re-exported: tools report errors with the flags they parse

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
INDEX_FLAG_ALIASES = ("--train_file", "--src_json_file")  # the original scripts' names for the input index


_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


def bounded(
    kind: type = int, minimum: float | None = None, maximum: float | None = None, *, above: float | None = None
) -> Callable[[str], Any]:
    """An argparse `type` that parses `kind` and refuses values below `minimum`, above `maximum` or not above
    `above` at parse time, so a number out of range stops the command before it makes any folder."""
    limits = [(">=", minimum), ("<=", maximum), (">", above)]
    limits = [(sign, limit) for sign, limit in limits if limit is not None]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not all(_COMPARE[sign](value, limit) for sign, limit in limits):  # NaN holds none
            raise argparse.ArgumentTypeError(f"must be {' and '.join(f'{s} {v:g}' for s, v in limits)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages; tools read `kind`
    parse.kind = kind  # type: ignore[attr-defined]
    return parse


positive_int = bounded(int, 1)  # steps, batch sizes, counts
positive_float = bounded(float, above=0.0)  # learning rates, tolerances
non_negative = bounded(float, 0.0)  # scales, weights
probability = bounded(float, 0.0, 1.0)


def option(
    default: object,
    help: str,
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[str] | None = None,
    kind: Callable[[str], Any] | None = None,
) -> Any:
    """A settings-dataclass field that is also a command-line flag, `--<flag or field name>` (and `aliases`), made
    by `add_settings_flags`. `kind` parses the value (default: the field's type); a bool field becomes
    `--name/--no-name`. A field declared without `option` is not a flag of its own (another group makes it)."""
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "kind": kind}
    return dataclasses.field(default=default, metadata=metadata)


def flag_dest(config_field: dataclasses.Field) -> str:
    """The argparse dest (= flag name) of a settings field: its `flag`, else its name."""
    return config_field.metadata.get("flag") or config_field.name


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def add_settings_flags(settings: type, group: argparse._ActionsContainer) -> None:
    """The flags of every `option` field of the dataclass `settings`, with its defaults, into `group`."""
    for config_field in dataclasses.fields(settings):
        meta = config_field.metadata
        if "help" not in meta:
            continue
        name = flag_dest(config_field)
        spellings = [f"--{name}", *(f"--{alias}" for alias in meta["aliases"])]
        kind = meta["kind"] or _KINDS[str(config_field.type).removeprefix("<class '").removesuffix("'>")]
        if kind is bool:
            group.add_argument(
                *spellings, dest=name, action=argparse.BooleanOptionalAction, default=config_field.default,
                help=meta["help"],
            )  # fmt: skip
            continue
        group.add_argument(
            *spellings, dest=name, type=kind, default=config_field.default, choices=meta["choices"], help=meta["help"]
        )


def settings_from_args(settings: type, args: argparse.Namespace, **values: object) -> Any:
    """The dataclass `settings` from parsed flags: each field from its dest, except those given in `values`."""
    read = {f.name: getattr(args, flag_dest(f)) for f in dataclasses.fields(settings) if f.name not in values}
    return settings(**read, **values)


def settings_flags(instance: object) -> list[str]:
    """The command-line flags that select `instance`: those of its `option` fields that differ from the defaults."""
    defaults = type(instance)()
    out: list[str] = []
    for config_field in dataclasses.fields(instance):
        value, name = getattr(instance, config_field.name), flag_dest(config_field)
        if "help" not in config_field.metadata or value == getattr(defaults, config_field.name):
            continue
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        else:
            out += [f"--{name}", str(value)]
    return out


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
        raise UsageError(f"--mixed_precision: {mixed_precision!r} is not one of {sorted(DTYPES)}")
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
            type=bounded(int, 1, 255),  # ids 0..num_cls-1 must leave 255 for ignore
            required=num_cls == "required",
            help="number of classes (mask ids 0..num_cls-1, 255 = ignore)",
        )


def add_pair_flags(parser: argparse.ArgumentParser) -> None:
    """How image-mask pairs are prepared for training: train.py, and cache_latents, whose cache must match it."""
    group = parser.add_argument_group("pairs")
    group.add_argument(
        "--resolution",
        type=positive_int,
        default=512,
        help="short side resize + centre crop, px (multiple of VAE factor x patch)",
    )
    group.add_argument(
        "--flip_prob",
        type=probability,
        default=0.5,
        help="random horizontal flip of image and mask together (cache_latents: > 0 also caches the flipped pair)",
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
        group.add_argument("--seed", type=bounded(int, 0), default=seed_default, help=seed_help)  # numpy's need >= 0
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


class _BadFlag(Exception):
    """argparse's complaint about the command line, carried out of `parse_args` to be reported as one line."""


def _refuse(message: str) -> None:
    # argparse says "argument --x/--y: what"; the line names the flag first, as every crfm error names its file.
    if message.startswith("argument "):
        flag, _, what = message.removeprefix("argument ").partition(": ")
        message = f"{flag.split('/')[0]}: {what}"
    raise _BadFlag(message)


def run_cli(
    parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], object], argv: list[str] | None
) -> int:
    """Parse `argv`, run `body(args)`; a bad flag and the expected failures become one stderr line, exit status 2.

    `body` returns its exit status, or anything else (None, a summary) for success. `--help` still prints and exits.
    """
    parser.error = _refuse  # instead of the usage text and a second line: one line naming the flag
    try:
        args = parser.parse_args(argv)
    except _BadFlag as exc:
        return report_error(exc)
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
