"""Where a rank's start-up went, from its process's birth to the end of its first iteration.

A relaunch is part of every restart, so its parts are reported as the iteration times are: one
console line after the first iteration and a ``startup`` record in ``--metrics-file``. The parts
follow each other on the training thread; the checkpoint flusher comes up beside them, so its
start is reported apart, with what the first iteration waited for it.
"""

from __future__ import annotations

import os
import time

INTERPRETER = "interpreter and imports"
PROCESS_GROUPS = "process groups"
MODEL = "model, optimizer and data"
ENGINE = "checkpoint engine"
LOAD = "load"
FIRST_ITERATION = "first iteration"


def process_age_seconds() -> float:
    """Seconds since this process was created (``/proc/self/stat``'s start time against
    ``/proc/uptime``, both since boot: 10 ms resolution); 0 where ``/proc`` has neither."""
    try:
        with open("/proc/self/stat") as f:
            # the command name may hold spaces: the fields after its closing parenthesis
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StartupClock:
    """Marks the end of each start-up part on the training thread (monotonic clock)."""

    def __init__(self):
        now = time.monotonic()
        self.began = now - process_age_seconds()
        self._last = self.began
        self.parts: dict[str, float] = {}
        """Seconds of each part, in the order they ended."""
        self.flusher: dict[str, float] | None = None
        """The flusher's start (seconds to ready, its CPU, its unshared memory, what the first
        iteration waited for it, how it was started), when the engine runs."""
        self.ended_unix: float | None = None
        """Wall-clock time (``time.time``) at the end of the first iteration: a bench that knows
        when it launched the job computes launch-to-first-iteration from it."""

    def mark(self, part: str) -> None:
        """``part`` ended now (a part marked twice adds up)."""
        now = time.monotonic()
        self.parts[part] = self.parts.get(part, 0.0) + now - self._last
        self._last = now

    def finish(self, engine_stats=None, how_started: str | None = None) -> None:
        """The first iteration ended (marked here); take the flusher's start from the engine's stats."""
        self.mark(FIRST_ITERATION)
        self.ended_unix = time.time()
        if engine_stats is not None:
            self.flusher = {"ready_seconds": engine_stats.flusher_start_seconds,
                            "cpu_seconds": engine_stats.flusher_start_cpu_seconds,
                            "unshared_mib": engine_stats.flusher_rss_bytes / 2**20,
                            "waited_seconds": engine_stats.flusher_ready_wait_seconds,
                            "started": how_started or ""}

    @property
    def total_seconds(self) -> float:
        return sum(self.parts.values())

    def record(self) -> dict:
        """The metrics file's ``startup`` object."""
        record = {"seconds": round(self.total_seconds, 3),
                  "parts": {name: round(seconds, 3) for name, seconds in self.parts.items()},
                  "first_iteration_end_unix": self.ended_unix}
        if self.flusher is not None:
            record["flusher"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.flusher.items()}
        return record

    def line(self) -> str:
        """The console's line, e.g. ``> start-up 6.8 s to the end of the first iteration: ...``."""
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.parts.items())
        text = f"> start-up {self.total_seconds:.1f} s to the end of the first iteration: {parts}"
        if self.flusher is not None:
            f = self.flusher
            text += (f"; checkpoint flusher ({f['started']}) ready {f['ready_seconds']:.2f} s after its start, "
                     f"{f['cpu_seconds']:.2f} s of CPU, {f['unshared_mib']:.0f} MiB unshared, "
                     f"the first iteration waited {f['waited_seconds']:.2f} s for it")
        return text
