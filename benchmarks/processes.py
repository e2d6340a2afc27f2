"""Child processes of the benches: each a job of its own, with a time limit, killed whole.

A bench measures in fresh processes (OpenMP reads its wait policy once, at load; a trainer run
must not inherit the bench's memory or rendezvous), and a run that overstays its time must take
everything it started with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "scripts", "pretrain_gpt.py")
"""The product command line the benches run, as a user runs it."""
BENCH_CHECKPOINT = os.path.join(REPO, "scripts", "bench_checkpoint.py")
BENCH_TRAINER_GPU = os.path.join(REPO, "scripts", "bench_trainer_gpu.py")
"""The benches' command lines: their hidden flags (``--child``, ``--part hardware``) run a
measurement in a fresh process."""

JOB_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""What torchrun sets for a job: a child that must be a job of its own may not inherit them (it
would join the bench's job, or bind its port)."""


def job_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a child that is a job of its own: without the rendezvous
    variables and ``drop``, with ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and k not in drop}
    env.update(extra or {})
    return env


def child_json(cmd: list[str], env: dict[str, str], what: str) -> dict:
    """Run a bench child to its end and return the JSON line it printed last. A child that
    measured, then died on its way out (once: "terminate called without an active exception" at
    exit) keeps its numbers, said."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        print(f"  ({what} exited with {proc.returncode} after printing its result: {last})", flush=True)
    return json.loads(lines[-1])


class Terminated(Exception):
    """SIGTERM (``timeout`` in gpu_check.sh): stop the runs, keep what was measured."""


def raise_terminated(signum, _frame):
    """A SIGTERM handler: turns the signal into :class:`Terminated` in the main thread."""
    raise Terminated(signal.Signals(signum).name)


RUNNING: set["LoggedProcess"] = set()
"""Child processes alive now: each runs in a session of its own, so a signal to the bench does
not reach them, and they must be killed here (:func:`kill_running`)."""


def kill_running() -> None:
    for running in list(RUNNING):
        running.kill()


class LoggedProcess:
    """A child in a session of its own (a kill takes whatever it started), its stdout and
    stderr into ``log_path`` and, with ``echo``, prefixed with it on this process's stdout;
    :meth:`finish` waits for it until ``timeout_s`` (None: no limit) after its start."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str, timeout_s: float | None,
                 echo: str | None = None, header: str | None = None):
        self.log_path, self.timeout_s, self.echo = log_path, timeout_s, echo
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        self.log = open(log_path, "w")
        if header:
            self.log.write(header + "\n")
            self.log.flush()
        self.started = time.monotonic()
        env = dict(env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     text=True, bufsize=1, start_new_session=True)
        RUNNING.add(self)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if self.echo is not None:
                print(f"{self.echo} {line}", end="", flush=True)

    def kill(self) -> None:
        # SIGKILL, not SIGTERM: the trainer answers SIGTERM with a final save and a drain, which
        # is what we are out of time for.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> tuple[int, bool, float, str]:
        """(exit code, timed out, wall seconds, the log's text) once the child has ended, killed
        at its deadline."""
        timed_out = False
        remaining = None if self.timeout_s is None else max(self.timeout_s - (time.monotonic() - self.started), 0.1)
        try:
            rc = self.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            rc = self.proc.wait()
        RUNNING.discard(self)
        self.reader.join(timeout=10)
        wall = time.monotonic() - self.started
        self.log.close()
        with open(self.log_path) as f:
            text = f.read()
        return rc, timed_out, wall, text


class Budget:
    """The wall-clock budget of a bench's runs: a run gets min(its timeout, what is left), and a
    run whose expected time no longer fits is skipped with a note instead of being cut short."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout_for(self, timeout_s: float, estimate_s: float) -> tuple[float, str | None]:
        """(the timeout to give a run, None) or (0, why it is skipped)."""
        left = self.left()
        if left < estimate_s:
            return 0.0, f"{left:.0f} s of the budget left, the run needs ~{estimate_s:.0f} s"
        return min(timeout_s, left), None


class TrainerFailed(RuntimeError):
    """A trainer run that a bench builds on (not one it measures) failed: its log says why."""


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer run as a 1-process job of its own on the CPU with one OpenMP
    thread, ``extra`` on top."""
    return job_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GPT_FORCE_CPU": "1", **(extra or {})})


Launcher = Callable[[list[str], dict[str, str], float], "tuple[int, bool, str] | None"]
"""Runs ``pretrain_gpt.py`` with (args, environment, timeout in seconds) another way than a fresh
interpreter; returns (exit code, timed out, its output), or None where it cannot (the run then
starts a fresh interpreter). The tests pass one that forks each run from a process that has
imported torch already (``tests/fault_trial_checks.py``)."""


def run_trainer(args: list[str], log_path: str, env: dict[str, str] | None = None, timeout_s: float = 300,
                check: bool = True, launcher: Launcher | None = None) -> tuple[int, bool, str]:
    """``pretrain_gpt.py args`` as a 1-process job of its own on the CPU with one OpenMP thread
    (``env`` on top): (exit code, timed out, its output). ``check``: raise
    :class:`TrainerFailed` unless it ended with 0 in time. ``launcher``: see :data:`Launcher`."""
    launched = launcher(args, trainer_env(env), timeout_s) if launcher is not None else None
    if launched is not None:
        rc, timed_out, text = launched
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "w") as log:
            log.write(text)
    else:
        rc, timed_out, _, text = LoggedProcess([sys.executable, PRETRAIN, *args], trainer_env(env), log_path,
                                               timeout_s).finish()
    if check and (rc != 0 or timed_out):
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit code {rc}"
        raise TrainerFailed(f"pretrain_gpt.py {' '.join(args)}: {why} (log {log_path}):\n{text[-4000:]}")
    return rc, timed_out, text
