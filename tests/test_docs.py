"""README stays in step with the code: every command-line flag is in its flag reference, and the test command it
gives is the one CI runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _flags_table():
    spec = importlib.util.spec_from_file_location("flags_table", REPO / "scripts" / "flags_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_flag_is_in_the_flag_reference():
    pytest.importorskip("mmseg")
    module = _flags_table()
    reference = README[README.index("## Flag reference") :]
    for command, parser in module.parsers().items():
        section = reference[reference.index(f"**`{command}`**") :]
        section = section[: section.index("\n\n", section.index("|---|"))]
        for flags, _, _ in module.flag_rows(parser):
            assert flags in section, f"{command}: {flags} missing from README's flag reference"


def test_readme_test_command_is_what_ci_runs():
    commands = re.findall(r"^bash (\S+)\s+#", README, flags=re.MULTILINE)
    assert commands[:2] == ["demo.sh", "scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
