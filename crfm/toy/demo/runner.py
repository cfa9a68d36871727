"""How the demo runs its commands and stages: every tool as `python -m <module>` (printed first, so each step can
be repeated by hand at real scale), independent commands side by side one thread each, and a stage marker that lets
a re-run reuse a finished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from crfm.toy.demo.settings import PACKAGE_PARENT
from crfm.utils.fileio import write_text_atomic
from crfm.utils.runs import offline_env

Job = tuple[Path, str, list[object]]  # (log file, module, args) of a command `run_together` runs


class StageRunner:
    """Commands and stage markers under the output folder `out`; `parallel` commands at once in `run_together`."""

    def __init__(self, out: Path, parallel: int, progress: bool) -> None:
        self.out = out
        self.parallel = parallel
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.env = {  # the tools import this crfm, offline (crfm.utils.runs: the one offline environment)
            **offline_env(threads=None),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
        }

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def quiet(self) -> list[str]:
        return [] if self.progress else ["--no_progress"]

    def command(self, module: str, *cmd: object) -> list[str]:
        """`python -m module cmd...`, printed as a user in this folder would type it (paths below it relative)."""
        args = [str(c) for c in cmd]
        inside = str(Path.cwd()) + os.sep
        shown = " ".join(a.removeprefix(inside) for a in args)
        print(f"$ python -m {module} {shown}", flush=True)
        return [sys.executable, "-m", module, *args]

    def job(self, work: str, module: str, args: list[object]) -> Job:
        """`python -m module args` for `run_together`, logging to logs/<work>.log."""
        return self.path("logs", f"{work}.log"), module, args

    def run(self, module: str, *cmd: object, one_thread: bool = False) -> None:
        """One command in this process's folder, its output shown; on one thread while others run beside it."""
        env = {**self.env, "OMP_NUM_THREADS": "1"} if one_thread else self.env
        subprocess.run(self.command(module, *cmd), check=True, env=env)

    def run_together(
        self, jobs: list[Job], lanes: int | None = None, beside: Callable[[], object] | None = None
    ) -> None:
        """Independent commands (log file, module, args), `lanes` (default `parallel`) at a time on one thread each:
        the small models of the demo use two cores better as two processes than as two threads of one (fewer
        commands than lanes share the lanes' threads). Each command's output goes to its log file; its last line is
        shown, and a failure shows the log's end and stops the stage. `beside` runs in this thread meanwhile (after
        every command was printed); when it ends first, this thread takes the commands still waiting, so neither core
        idles while the other has a queue."""
        lanes = max(1, self.parallel if lanes is None else lanes)
        threads = max(1, lanes // max(1, len(jobs)))
        env = {**self.env, "OMP_NUM_THREADS": str(threads)} if self.parallel > 1 else self.env
        commands = [(log, self.command(module, *args)) for log, module, args in jobs]

        def one(job: tuple[Path, list[str]]) -> None:
            log, argv = job
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as handle:
                done = subprocess.run(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
            lines = log.read_text(errors="replace").splitlines()
            if done.returncode:
                print("\n".join(lines[-20:]), file=sys.stderr, flush=True)
                raise subprocess.CalledProcessError(done.returncode, argv)
            print(f"[{log.name}] {lines[-1] if lines else ''}", flush=True)

        waiting = deque(commands)

        def drain() -> None:
            while True:
                try:
                    job = waiting.popleft()  # atomic: each command is taken by one lane
                except IndexError:
                    return
                one(job)

        with ThreadPoolExecutor(lanes) as pool:
            running = [pool.submit(drain) for _ in range(lanes)]
            if beside is not None:
                beside()
                drain()
            for lane in running:
                lane.result()  # re-raises the first failure

    def stage(
        self, number: int, total: int, name: str, title: str, action: Callable[[], object],
        results: Callable[[], list[Path]] | None = None,
    ) -> None:  # fmt: skip
        """Run `action` unless an earlier run finished it and left every one of its `results` (a stage that gained
        results since, e.g. a downstream row added by an update, or lost some is redone; finished parts are kept or
        resume at their end)."""
        marker = self.path("stages", f"{name}.json")
        print(f"\n=== [{number}/{total}] {title} ===", flush=True)
        if marker.is_file() and all(path.is_file() for path in (results() if results else [])):
            self.timings[name] = json.loads(marker.read_text())["seconds"]
            print(f"done in an earlier run ({self.timings[name]:.0f} s), reused")
            return
        start = time.perf_counter()
        action()
        self.timings[name] = round(time.perf_counter() - start, 1)
        write_text_atomic(marker, json.dumps({"seconds": self.timings[name]}) + "\n")
        print(f"--- {name}: {self.timings[name]:.0f} s")
