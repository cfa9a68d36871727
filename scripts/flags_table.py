"""The flag reference in docs/flags.md, generated from the entry points' argparse parsers.

    python scripts/flags_table.py            # print every command's table (Markdown)
    python scripts/flags_table.py --write    # refresh the generated part of docs/flags.md
    python scripts/flags_table.py --check    # exit 1 if docs/flags.md is out of date

Each command's table sits in docs/flags.md between `<!-- flags: NAME -->` and `<!-- /flags: NAME -->`; the text
around the tables is written by hand and kept. A command whose module cannot be imported here (mmseg/mmcv not
installed yet) keeps its previous table, with a warning. tests/test_docs.py checks that every flag is listed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
FLAGS_DOC = REPO / "docs" / "flags.md"
sys.path.insert(0, str(REPO))


class Command(NamedTuple):
    name: str  # the documented command: the section heading in docs/flags.md
    module: str  # the module whose build_parser() defines its flags
    also: str  # other ways to run the same thing


COMMANDS = (
    Command(
        "python -m crfm.toy.demo",
        "crfm.toy.demo",
        "`bash demo.sh` (set-up first), `python -m crfm.toy.demo`, `crfm-demo`",
    ),
    Command(
        "python -m crfm.data.make_index", "crfm.data.make_index", "`python -m crfm.data.make_index`, `crfm-make-index`"
    ),
    Command("python -m crfm.data.layouts", "crfm.data.layouts", "`python -m crfm.data.layouts`, `crfm-layouts`"),
    Command(
        "preprocess/vectorize.py",
        "crfm.data.vectorize",
        "`python -m crfm.data.vectorize`, `crfm-vectorize`",
    ),
    Command(
        "python -m crfm.training.cache_latents",
        "crfm.training.cache_latents",
        "`crfm-cache-latents` (under `accelerate launch` for several processes)",
    ),
    Command(
        "train.py",
        "crfm.training.train",
        "`train.sh`, `python -m crfm.training.train`, `crfm-train` (under `accelerate launch` for several processes)",
    ),
    Command(
        "test.py",
        "crfm.sampling.synthesis",
        "`test.sh`, `crfm_test.sh` (with CRFM), `python -m crfm.sampling.synthesis`, `crfm-synthesize`",
    ),
    Command(
        "scripts/train_segmentor.py",
        "crfm.segmentation.downstream",
        "`downstream.sh`, `python -m crfm.segmentation.downstream`, `crfm-train-segmentor`",
    ),
    Command(
        "python -m crfm.segmentation.evaluate",
        "crfm.segmentation.evaluate",
        "`python -m crfm.segmentation.evaluate`, `crfm-evaluate`",
    ),
    Command(
        "python -m crfm.segmentation.filter",
        "crfm.segmentation.filter",
        "`crfm-filter`",
    ),
    Command(
        "python -m crfm.segmentation.hardness",
        "crfm.segmentation.hardness",
        "`crfm-hardness`",
    ),
    Command("python -m crfm.report", "crfm.report", "`crfm-report` (the recipe's last step, `scripts/recipe.sh`)"),
    Command(
        "python -m crfm.reflow",
        "crfm.fewstep.pairs",
        "`python -m crfm.fewstep.pairs`, `crfm-reflow`",
    ),
    Command(
        "python -m crfm.evaluate_sampling",
        "crfm.fewstep.evaluate",
        "`python -m crfm.fewstep.evaluate`, `crfm-evaluate-sampling`",
    ),
    Command("python -m crfm.toy.tiny", "crfm.toy.tiny", "`python -m crfm.toy.tiny`, `crfm-tiny`"),
    Command("python -m crfm.toy.toydata", "crfm.toy.toydata", "`python -m crfm.toy.toydata`, `crfm-toydata`"),
)


def build_parser(command: Command) -> argparse.ArgumentParser:
    """The command's parser; raises ImportError when its module (or what it imports) is unavailable."""
    return importlib.import_module(command.module).build_parser()


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Command name -> its parser, for every command docs/flags.md documents (all must import)."""
    return {command.name: build_parser(command) for command in COMMANDS}


def _shown(value: object) -> str:
    """A default as shown: paths inside the checkout relative to it."""
    text = str(value)
    return text[len(str(REPO)) + 1 :] if text.startswith(str(REPO) + "/") else text


def _cell(text: str) -> str:
    """Markdown-safe table cell: pipes escaped, <placeholders> kept visible (not read as HTML tags)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    try:  # argparse's own expansion of %(default)s, %(choices)s, %% ...
        return argparse.HelpFormatter(prog)._expand_help(action)
    except (KeyError, TypeError, ValueError):
        return action.help


def option_cell(action: argparse.Action) -> str:
    """Every option string of an action (aliases included), or a positional's name."""
    if action.option_strings:
        return ", ".join(f"`{option}`" for option in action.option_strings)
    return f"`{action.metavar or action.dest}` (positional)"


def flag_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(option strings, default, meaning) for every documented action of a parser."""
    rows = []
    for action in parser._actions:  # argparse has no public accessor for its actions
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if action.required or (not action.option_strings and action.nargs in (None, "+")):
            default = "(required)"
        elif isinstance(action, argparse._StoreTrueAction):
            default = "off"
        elif isinstance(action, argparse._StoreFalseAction):
            default = "on"
        else:
            value = action.default
            default = "" if value in (None, "", argparse.SUPPRESS) else f"`{_shown(value)}`"
        text = _shown(_help(action, parser.prog)).replace(str(REPO) + "/", "")
        if action.choices and "choices" not in (action.help or ""):
            text = f"{text} ({', '.join(map(str, action.choices))})".strip()
        rows.append((option_cell(action), default, _cell(text)))
    return rows


def table(parser: argparse.ArgumentParser) -> str:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    lines += [f"| {flags} | {default} | {text} |" for flags, default, text in flag_rows(parser)]
    return "\n".join(lines)


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- flags: {name} -->", f"<!-- /flags: {name} -->"


def section_text(document: str, name: str) -> str:
    """The generated table of one command in docs/flags.md (KeyError if the section is missing)."""
    begin, end = section_markers(name)
    if begin not in document or end not in document:
        raise KeyError(f"docs/flags.md has no section for {name!r} ({begin} ... {end})")
    return document[document.index(begin) + len(begin) : document.index(end)]


def refreshed(document: str) -> tuple[str, list[str]]:
    """docs/flags.md with every importable command's table regenerated; also the commands left as they were."""
    kept = []
    for command in COMMANDS:
        begin, end = section_markers(command.name)
        try:
            body = table(build_parser(command))
        except ImportError as exc:
            kept.append(f"{command.name}: {exc}")
            continue
        if begin in document and end in document:
            start, stop = document.index(begin) + len(begin), document.index(end)
            document = f"{document[:start]}\n{body}\n{document[stop:]}"
        else:  # a new command: appended with a heading, to be moved and described by hand
            document = (
                f"{document.rstrip()}\n\n### `{command.name}`\n\nAlso: {command.also}.\n\n{begin}\n{body}\n{end}\n"
            )
    return document, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="refresh the generated tables in docs/flags.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/flags.md is out of date")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        for command in COMMANDS:
            print(f"### `{command.name}`\n\nAlso: {command.also}.\n\n{table(build_parser(command))}\n")
        return 0
    old = FLAGS_DOC.read_text(encoding="utf-8")
    new, kept = refreshed(old)
    for line in kept:
        print(f"warning: table kept as it was, the parser could not be built: {line}", file=sys.stderr)
    if args.check:
        if new != old:
            print("docs/flags.md is out of date: python scripts/flags_table.py --write", file=sys.stderr)
            return 1
        return 0
    if new != old:
        FLAGS_DOC.write_text(new, encoding="utf-8")
    print(f"{FLAGS_DOC.relative_to(REPO)}: {'updated' if new != old else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
