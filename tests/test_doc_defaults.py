"""Every default the documentation states is the code's: docs/flags.md is generated from the parsers
(scripts/flags_table.py, tests/test_docs.py); the prose states defaults in four checked forms:

- "`--flag value` (default)" and "`--flag` … (default value)": the flag's default in every command that has it
  (a None default passes the flag on to a tool that has its own, as the demo does);
- "`<command>`'s defaults …: `--a 1 --b`": each flag's default in that command's parser;
- "`CRFMConfig.paper()`: `--a 1 …`": test.py's flags that build `CRFMConfig.paper()`.
"""

from __future__ import annotations

import argparse
import re

import pytest

from tests.helpers import REPO
from tests.test_docs import FLAGS_TABLE, _parser

# The generated flag reference is checked by tests/test_docs.py; its help texts are the parsers' own.
DOCS = [REPO / "README.md", *sorted(path for path in (REPO / "docs").glob("*.md") if path.name != "flags.md")]
SINGLE = (
    re.compile(r"`(?P<flag>--[\w-]+) (?P<value>[^`\s]+)` \(default\)"),
    re.compile(r"`(?P<flag>--[\w-]+)`[^`\n(]{0,40}\(default (?P<value>[^)\s]+)\)"),
)
PROSE = {"once": "1", "twice": "2"}  # numbers the prose writes as words
COMMAND_DEFAULTS = re.compile(r"`(?P<command>[^`]+)`'s defaults[^:]{0,200}?:\s*`(?P<flags>--[^`]+)`")
PAPER = re.compile(r"`CRFMConfig\.paper\(\)`:\s*`(?P<flags>--[^`]+)`")


def text(path) -> str:
    return path.read_text(encoding="utf-8")


def parsers() -> dict[str, argparse.ArgumentParser]:
    return {command.name: _parser(command) for command in FLAGS_TABLE.COMMANDS}


def parsed(parser: argparse.ArgumentParser, flag: str, value: str | None) -> object:
    """What `flag value` (or the bare `flag`) sets its destination to."""
    action = parser._option_string_actions[flag]  # argparse has no public accessor for its actions
    if isinstance(action, argparse.BooleanOptionalAction):
        assert value is None, f"{flag} takes no value"
        return not flag.startswith("--no-")
    if action.nargs == 0:
        return action.const
    value = PROSE.get(value, value)
    return action.type(value) if callable(action.type) else value


def flag_values(flags: str) -> list[tuple[str, str | None]]:
    """`--a 1 --b --c x` -> [(--a, 1), (--b, None), (--c, x)]."""
    tokens, pairs = flags.split(), []
    for position, token in enumerate(tokens):
        if token.startswith("--"):
            following = tokens[position + 1] if position + 1 < len(tokens) else "--"
            pairs.append((token, None if following.startswith("--") else following))
    return pairs


def single_claims() -> list[tuple[str, str, str]]:
    return [
        (path.name, match["flag"], match["value"])
        for path in DOCS
        for pattern in SINGLE
        for match in pattern.finditer(text(path))
    ]


def command_claims() -> list[tuple[str, str, str]]:
    return [(path.name, m["command"], m["flags"]) for path in DOCS for m in COMMAND_DEFAULTS.finditer(text(path))]


def test_the_docs_state_defaults_in_the_checked_forms():
    # The checks below must have something to check: the CRFM defaults and the paper's setting among them.
    assert len(single_claims()) >= 3
    assert ("design.md", "test.py") in {(doc, command) for doc, command, _ in command_claims()}
    assert any(PAPER.search(text(path)) for path in DOCS)


@pytest.mark.parametrize("doc, flag, value", single_claims())
def test_a_stated_default_is_the_flags_default_in_every_command(doc, flag, value):
    having = {
        name: parser
        for name, parser in parsers().items()
        if flag in parser._option_string_actions and parser._option_string_actions[flag].default is not None
    }
    assert having, f"{doc}: {flag} is no command's flag with a default"
    for name, parser in having.items():
        default = parser._option_string_actions[flag].default
        assert parsed(parser, flag, value) == default, f"{doc}: {flag} defaults to {default!r} in {name}, not {value}"


@pytest.mark.parametrize("doc, command, flags", command_claims())
def test_a_commands_stated_defaults_are_its_parsers(doc, command, flags):
    parser = parsers()[command]
    for flag, value in flag_values(flags):
        default = parser._option_string_actions[flag].default
        assert parsed(parser, flag, value) == default, f"{doc}: {command}'s {flag} defaults to {default!r}"


def test_the_stated_paper_setting_is_crfmconfig_paper():
    from crfm.sampling.rectify import CRFMConfig

    parser = parsers()["test.py"]
    for path in DOCS:
        for match in PAPER.finditer(text(path)):
            args = argparse.Namespace(**{action.dest: action.default for action in parser._actions})
            for flag, value in flag_values(match["flags"]):
                setattr(args, parser._option_string_actions[flag].dest, parsed(parser, flag, value))
            assert CRFMConfig.from_args(args) == CRFMConfig.paper(), f"{path.name}: not CRFMConfig.paper()"


def test_the_checks_catch_a_wrong_default():
    parser = parsers()["test.py"]
    assert parsed(parser, "--rectified_step", "4") != parser._option_string_actions["--rectified_step"].default
    assert parsed(parser, "--no-l2_norm", None) != parser._option_string_actions["--l2_norm"].default
