"""The errors every layer raises and the one way entry points report them (crfm's ground floor: imports nothing
of crfm).

`UsageError` (flags that cannot work together, settings that do not fit what is on disk) and `DatasetError` (a bad
input file, named with its path or index line) are `ValueError`s, so `crfm.utils.flags.run_cli` reports either as
one `error: ...` line on stderr and exit status 2, the status argparse uses for a bad command line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path


class UsageError(ValueError):
    """A combination of flags or inputs that cannot work, found after parsing; reported as one line, exit 2."""


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and line or item at fault."""


def one_line(error: BaseException | str) -> str:
    """An error message on one line (multi-line messages, e.g. lists of bad index lines, joined with '; '). An
    OSError of a file names the file first, as every crfm error does: `<path>: no space left on device`."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
        error = f"{where}: {error.strerror[:1].lower()}{error.strerror[1:]}"
    parts = [part.strip() for part in str(error).splitlines() if part.strip()]
    return "; ".join(parts) or type(error).__name__


def report_error(error: BaseException | str) -> int:
    """Print `error: <message>` on one stderr line; returns the exit status 2."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


def unreadable(path: str | Path, what: str, error: BaseException) -> DatasetError:
    """`<path>: cannot read <what> (<cause>)`: a damaged or foreign file, named first so the line says which."""
    return DatasetError(f"{path}: cannot read {what} ({one_line(error)})")


@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Within: a failure to read `path` (truncated, damaged or foreign file, a tensor missing) becomes `unreadable`;
    errors that already say what is wrong (ValueErrors: DatasetError, UsageError) pass through."""
    try:
        yield
    except ValueError:
        raise
    except Exception as exc:  # safetensors' SafetensorError is a bare Exception, a missing tensor a KeyError
        raise unreadable(path, what, exc) from exc
