"""Running and measuring many commands: the offline subprocess runner, a job queue with prerequisites, timing and
mean ± std. bench/ is built on these (one copy of each instead of one per script); stdlib only.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]  # the checkout (crfm is installed editable from it)


def offline_env(threads: int | None = 1) -> dict[str, str]:
    """This process's environment with the Hub offline (a wrong path fails at once, nothing is downloaded) and, by
    default, one thread per process: bench jobs run side by side on few cores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log: Path | None = None, threads: int | None = 1) -> None:
    """Run `cmd` from the checkout, printed first as typed; its output is appended to `log` (None: discarded).
    Raises `subprocess.CalledProcessError` when it fails."""
    shown = ["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd
    print("$", shlex.join(shown), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, env=offline_env(threads), cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        subprocess.run(cmd, check=True, env=offline_env(threads), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)


class Job(NamedTuple):
    name: str
    after: list[str]  # names of the jobs it waits for
    work: Callable[[], object]


def run_jobs(jobs: list[Job], workers: int = 1) -> dict[str, str]:
    """Run `jobs` on `workers` threads; each worker takes the first job whose prerequisites are done (list the most
    wanted first). A failed command fails its dependants, not the others. Returns name -> "done" | "failed"."""
    wake = threading.Condition()
    state = {job.name: "todo" for job in jobs}

    def next_job() -> Job | None:
        with wake:
            while True:
                pending = [job for job in jobs if state[job.name] == "todo"]
                for job in pending:
                    if any(state[name] == "failed" for name in job.after):
                        state[job.name] = "failed"
                pending = [job for job in pending if state[job.name] == "todo"]
                if not pending:
                    return None
                ready = [job for job in pending if all(state[name] == "done" for name in job.after)]
                if ready:
                    state[ready[0].name] = "running"
                    return ready[0]
                wake.wait()

    def worker() -> None:
        while (job := next_job()) is not None:
            try:
                job.work()
                outcome = "done"
            except subprocess.CalledProcessError as error:
                print(f"[jobs] {job.name} failed: {error}", flush=True)
                outcome = "failed"
            with wake:
                state[job.name] = outcome
                wake.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return state


def run_jobs_or_exit(jobs: list[Job], workers: int = 1) -> None:
    """`run_jobs`, then exit naming the failed jobs if any (a bench script's table needs them all)."""
    state = run_jobs(jobs, workers)
    if "failed" in state.values():
        raise SystemExit(f"failed: {', '.join(name for name, outcome in state.items() if outcome == 'failed')}")


def print_table(text: str, path: Path | None, command: str) -> None:
    """A bench table printed and, with `path`, written there under the command that made it."""
    print(text)
    if path is not None:
        path.write_text(f"`{command}`\n\n" + text)


def mean_std(values: Iterable[float], digits: int = 2) -> str:
    """The values as "mean ± std" (sample std), one value alone, "–" for none."""
    values = list(values)
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` calls after `warmup` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, timed in rounds that call each once in turn: load from other jobs on a
    shared machine then falls on all of them alike, not on whichever ran in a busy minute."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}
