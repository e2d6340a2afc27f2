"""The GPU bench's trainer runs: each one process with its own timeout within the bench's budget,
a failed one reported with the tail of its log while the others go on."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from benchmarks.gpu_plan import STARTUP_S, RunSpec
from benchmarks.gpu_shapes import Shape
from benchmarks.processes import BENCH_TRAINER_GPU, Budget, LoggedProcess, job_env
from benchmarks.trainer_output import ParsedLog, parse_run

SHM_DIR = "/dev/shm"
"""Where the engine's host pool lives (``--ckpt-host-dir``'s default)."""


@dataclass
class RunResult:
    spec: RunSpec
    rc: int | None = None
    timed_out: bool = False
    skipped: str | None = None
    wall_s: float = 0.0
    log_path: str | None = None
    tail: str = ""
    parsed: ParsedLog = field(default_factory=ParsedLog)
    stats: dict | None = None
    """The engine's counters on rank 0 (``checkpointing.engine.run_report.rank_numbers``; None: no engine)."""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out and self.skipped is None

    def failure(self) -> str | None:
        if self.skipped:
            return f"not run: {self.skipped}"
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        if self.rc != 0:
            return f"exit code {self.rc}"
        return None


class Running:
    """One trainer run of the plan: its output goes to ``logdir/<key>.log`` and, prefixed, to our
    stdout; :meth:`finish` gathers its numbers (metrics file, engine counters) once it ended."""

    def __init__(self, spec: RunSpec, logdir: str, timeout_s: float):
        self.spec = spec
        env = job_env(spec.env)  # a plain launch is a 1-process job even if this bench runs under torchrun
        self.process = LoggedProcess(spec.command(), env, os.path.join(logdir, f"{spec.key}.log"), timeout_s,
                                     echo=f"[{spec.key}]", header=f"$ {spec.display()}")
        print(f"[{spec.key}] started (timeout {timeout_s:.0f} s): {spec.display()}", flush=True)

    def finish(self) -> RunResult:
        rc, timed_out, wall_s, text = self.process.finish()
        result = RunResult(self.spec, rc=rc, timed_out=timed_out, wall_s=wall_s, log_path=self.process.log_path)
        result.parsed = parse_run(text, self.spec.metrics_path)
        result.tail = "\n".join(text.splitlines()[-40:])
        if result.parsed.checkpoint is not None:
            result.stats = result.parsed.checkpoint["ranks"][0]
        print(f"[{self.spec.key}] {'ok' if result.ok else result.failure()} in {result.wall_s:.0f} s, "
              f"{len(result.parsed.iteration_ms)} iterations logged", flush=True)
        return result


def free_run_space(spec: RunSpec) -> None:
    """The engine run's pool (GBs of /dev/shm) and checkpoints (GBs of disk) go right after it."""
    if spec.pool_save_dir:
        from checkpointing.storage import remove_segments

        freed = remove_segments(spec.pool_save_dir)
        if freed:
            print(f"[{spec.key}] removed its shared-memory pool ({freed / 1e9:.1f} GB)", flush=True)
        shutil.rmtree(os.path.dirname(spec.pool_save_dir) + "/l1", ignore_errors=True)
        shutil.rmtree(spec.pool_save_dir, ignore_errors=True)


def shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None


def run_one(spec: RunSpec, logdir: str, budget: Budget) -> RunResult:
    timeout, why = budget.timeout_for(spec.timeout_s, spec.estimate_s)
    why = why and f"budget ({why})"
    free = shm_free_bytes() if spec.pool_bytes else None
    if not why and free is not None and free < spec.pool_bytes:
        why = f"{SHM_DIR} has {free / 1e9:.1f} GB free, the engine's pool needs ~{spec.pool_bytes / 1e9:.1f} GB"
    if why:
        print(f"[{spec.key}] not run: {why}", flush=True)
        return RunResult(spec, skipped=why)
    try:
        return Running(spec, logdir, timeout).finish()
    finally:
        free_run_space(spec)


def run_pair_concurrently(specs: tuple[RunSpec, RunSpec], logdir: str, budget: Budget) -> tuple[RunResult, RunResult]:
    """The two legs of (a) at once: the CPU leg needs no GPU and nothing of it is timed."""
    timeout = min(min(s.timeout_s for s in specs), budget.left())
    need = max(s.estimate_s for s in specs)
    if timeout < need:
        why = f"{budget.left():.0f} s of the budget left, the runs need ~{need:.0f} s"
        return RunResult(specs[0], skipped=f"budget ({why})"), RunResult(specs[1], skipped=f"budget ({why})")
    running = [Running(s, logdir, timeout) for s in specs]
    first, second = (r.finish() for r in running)
    return first, second


def run_hardware(logdir: str, budget: Budget) -> tuple[dict | None, str | None]:
    need = STARTUP_S / 2 + 10
    if budget.left() < need:
        return None, f"skipped: {budget.left():.0f} s of the budget left"
    json_path = os.path.join(logdir, "hardware.json")
    spec = RunSpec("c-hardware", "matmul peak and device-to-host copies", Shape.preset("tiny", 1024),
                   ["--part", "hardware", "--json", json_path], {}, min(90, budget.left()), need, 1, 1, False,
                   script=BENCH_TRAINER_GPU)
    result = Running(spec, logdir, spec.timeout_s).finish()
    if result.ok and os.path.exists(json_path):
        with open(json_path) as f:
            return json.load(f), None
    return None, f"{result.failure() or 'no result'}\n\n```\n{result.tail}\n```"
