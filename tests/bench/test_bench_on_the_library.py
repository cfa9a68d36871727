"""bench/ is built on the library: no script edits sys.path (crfm is installed), and none re-writes the shared
helpers of `crfm.utils.runs` (mean ± std, the offline subprocess runner, the job queue, timing)."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import REPO

SCRIPTS = sorted((REPO / "bench").glob("*.py"))
SHARED = {"mean_std", "median_seconds", "interleaved_medians", "run_logged", "run_jobs", "offline_env"}
# Subprocesses bench runs other than through run_logged: test.py's throughput, timed with its output kept.
OWN_SUBPROCESS = {"bench_sampling.py"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_scripts_use_the_installed_package_and_the_shared_helpers(path):
    text = path.read_text(encoding="utf-8")
    assert "sys.path" not in text, f"{path.name} edits sys.path: crfm is installed (pip install -e .)"
    defined = {node.name for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef)}
    assert not defined & SHARED, f"{path.name} re-defines {sorted(defined & SHARED)}: use crfm.utils.runs"
    if path.name not in OWN_SUBPROCESS:
        assert "subprocess.run(" not in text, f"{path.name} runs a subprocess itself: use crfm.utils.runs.run_logged"
