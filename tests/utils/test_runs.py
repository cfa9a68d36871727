"""crfm.utils.runs: what bench/ runs its jobs and tables with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crfm.utils.runs import Job, interleaved_medians, mean_std, run_jobs, run_logged
from tests.helpers import REPO


def test_mean_std_prints_every_count_one_way():
    assert mean_std([]) == "–"
    assert mean_std([1.234]) == "1.23"
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert mean_std(iter([1.0, 3.0]), digits=1) == "2.0 ± 1.4"


@pytest.mark.parametrize("workers", [1, 3])
def test_jobs_wait_for_their_prerequisites_and_a_failure_fails_only_its_dependants(workers):
    done: list[str] = []

    def work(name: str, fail: bool = False):
        def run() -> None:
            if fail:
                raise subprocess.CalledProcessError(1, [name])
            done.append(name)

        return run

    jobs = [
        Job("student", ["pairs"], work("student")),
        Job("eval", ["student"], work("eval")),
        Job("pairs", [], work("pairs")),
        Job("broken", [], work("broken", fail=True)),
        Job("after_broken", ["broken"], work("after_broken")),
        Job("alone", [], work("alone")),
    ]
    state = run_jobs(jobs, workers)
    assert state == {
        "student": "done", "eval": "done", "pairs": "done", "broken": "failed", "after_broken": "failed",
        "alone": "done",
    }  # fmt: skip
    assert done.index("pairs") < done.index("student") < done.index("eval")
    assert "after_broken" not in done


def test_timing_rounds_call_each_function_once_in_turn():
    calls: list[str] = []
    medians = interleaved_medians({"ours": lambda: calls.append("ours"), "theirs": lambda: calls.append("theirs")}, 3)
    assert calls == ["ours", "theirs"] * 4  # one warm-up round, then 3 timed ones
    assert set(medians) == {"ours", "theirs"} and all(value >= 0 for value in medians.values())


def test_commands_run_offline_from_the_checkout_with_their_output_in_the_log(tmp_path, capsys):
    log = tmp_path / "logs" / "job.log"
    code = "import os; print(os.environ['HF_HUB_OFFLINE'], os.environ['OMP_NUM_THREADS'], os.getcwd())"
    run_logged([sys.executable, "-c", code], log)
    assert capsys.readouterr().out.startswith("$ python -c ")  # as a user would type it
    offline, threads, cwd = log.read_text().split()
    assert (offline, threads) == ("1", "1")
    assert cwd == str(REPO)
    with pytest.raises(subprocess.CalledProcessError):
        run_logged([sys.executable, "-c", "raise SystemExit(3)"], log)
