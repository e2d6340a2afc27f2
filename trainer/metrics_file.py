"""The JSON-lines metrics file (``--metrics-file``): what benchmarks and tools read instead of
the console.

The logging rank (the last one, which has the loss and prints the console lines) appends one
object per logged iteration, right after that iteration's checkpoint request, one per evaluation
on the validation split, one after the first iteration with where the start-up went
(``trainer.startup``), and one at the end of the run::

    {"kind": "iteration", "iteration": 10, "lm_loss": 6.93, "learning_rate": 0.003, "grad_norm": 1.2,
     "iteration_time_ms": 68.5, "tokens_per_s": 3740.0, "consumed_samples": 80, "time": 1764670000.1,
     "checkpoint_stall_ms": 0.4, "checkpoint_stall_total_ms": 3.1}
    {"kind": "startup", "seconds": 6.1, "parts": {"interpreter and imports": 3.2, ...},
     "first_iteration_end_unix": 1764670000.0, "flusher": {"ready_seconds": 0.3, ...}}
    {"kind": "validation", "iteration": 10, "lm_loss": 7.01}
    {"kind": "rollback", "from_iteration": 30, "step": 25, "source": "L0", "seconds": 0.04,
     "reason": "on command", "branch": "rollback-20261207-120000-from-30", "skipped": [], "time": ...}
    {"kind": "summary", "iteration": 12, "iterations_trained": 12, "train_seconds": 0.9,
     "device": "cpu", "interrupted": false, "peak_rss_mib": [2210.4, 2198.7], "checkpoint": {...}}

``time`` is the wall clock (seconds since the epoch) when the object was written: the gap between
two consecutive iterations' ``time`` is what an iteration cost with everything around it, the
checkpoint request included. ``peak_rss_mib`` is every rank's peak resident memory on the host
(:func:`peak_resident_mib`, in rank order, gathered at the end of the run; not the GPU's memory).
On a GPU the summary also has ``peak_device_mib``: every rank's peak of the memory torch
allocated for tensors on its device (``torch.cuda.max_memory_allocated``, through
``trainer.device.DeviceContext.peak_memory_mib``; the caching allocator reserves somewhat more).
The ``checkpoint_*`` fields come with the asynchronous engine
(``--async-save``): this rank's stall in that iteration (fence waits and waits for a free slot)
and in the run so far. ``checkpoint`` in the summary (present when the engine ran) holds the
numbers the end-of-run checkpointing summary is made of: every rank's (``ranks``, each one
``checkpointing.engine.run_report.rank_numbers``) and the run's (``levels``, ``train_seconds``,
``zero_copy``, ``bytes_copied``, ``machine``: idle and steal shares, ``cpus``); with them
``checkpointing.engine.run_report.summary_lines`` prints the summary again. A loss that is not finite is written as
Python's ``json`` writes it (``NaN``, ``Infinity``), which :func:`read_metrics_file` reads back.
Each object is flushed as it is written, so a killed run keeps every line it logged.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

from checkpointing.base import open_own

ITERATION = "iteration"
VALIDATION = "validation"
SUMMARY = "summary"
STARTUP = "startup"
ROLLBACK = "rollback"


def peak_resident_mib() -> float:
    """This process's peak resident memory so far, in MiB: ``VmHWM`` of ``/proc/self/status``
    (the high-water mark of this program's own memory map; ``ru_maxrss`` would also count the
    parent's pages that a fork-then-exec child held before its exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, else KiB


class MetricsFile:
    """Appends to ``path`` on the logging rank; does nothing without a path or on other ranks."""

    def __init__(self, path: str | None, enabled: bool):
        self._file = None
        if path and enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open_own(path, "a")  # never through a planted link

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def iteration(self, iteration: int, loss: float, lr: float, grad_norm: float, iteration_time: float,
                  tokens_per_iteration: int, consumed_samples: int, checkpointer=None) -> None:
        """One logged iteration, after its checkpoint request; ``checkpointer``: the run's
        :class:`trainer.checkpointer.Checkpointer` (None without checkpointing)."""
        if self._file is None:
            return
        record = {"kind": ITERATION, "iteration": iteration, "lm_loss": loss, "learning_rate": lr,
                  "grad_norm": grad_norm, "iteration_time_ms": 1000 * iteration_time,
                  "tokens_per_s": tokens_per_iteration / iteration_time, "consumed_samples": consumed_samples,
                  "time": time.time()}
        engine = checkpointer.engine if checkpointer is not None else None
        if engine is not None:
            record["checkpoint_stall_ms"] = 1000 * engine.stats.stall_by_iteration.get(iteration, 0.0)
            record["checkpoint_stall_total_ms"] = 1000 * engine.stats.stall_seconds
        self._write(record)

    def startup(self, record: dict) -> None:
        """Where this rank's start-up went (``trainer.startup.StartupClock.record``), after its first iteration."""
        if self._file is not None:
            self._write({"kind": STARTUP, **record, "pid": os.getpid()})

    def validation(self, iteration: int, loss: float) -> None:
        """The validation loss of the evaluation after ``iteration``."""
        if self._file is not None:
            self._write({"kind": VALIDATION, "iteration": iteration, "lm_loss": loss})

    def rollback(self, record: dict) -> None:
        """A live rollback (``trainer.live_rollback``): from where to which step, from which level,
        how long it took, why, and the iterations it skips."""
        if self._file is not None:
            self._write({"kind": ROLLBACK, **record, "time": time.time()})

    def summary(self, iteration: int, iterations_trained: int, train_seconds: float, device: str,
                interrupted: bool, checkpoint: dict | None = None, peak_rss_mib: list[float] | None = None,
                peak_device_mib: list[float] | None = None) -> None:
        """The end of the run: where it stopped, how long it trained, on what, every rank's peak
        resident memory (``peak_rss_mib``, in rank order), on a GPU every rank's peak device
        memory (``peak_device_mib``) and the checkpointing summary's numbers (``checkpoint``,
        None without the engine)."""
        if self._file is None:
            return
        record = {"kind": SUMMARY, "iteration": iteration, "iterations_trained": iterations_trained,
                  "train_seconds": train_seconds, "device": device, "interrupted": interrupted}
        if peak_rss_mib is not None:
            record["peak_rss_mib"] = peak_rss_mib
        if peak_device_mib is not None:
            record["peak_device_mib"] = peak_device_mib
        if checkpoint is not None:
            record["checkpoint"] = checkpoint
        self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class MetricsRecords:
    """A metrics file read back: its objects by kind, in file order."""

    iterations: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)
    summary: dict | None = None
    """The last summary object (None: the run did not reach its end)."""
    startup: dict | None = None
    """The last start-up object (None: no first iteration ended)."""


def read_metrics_file(path: str) -> MetricsRecords:
    """The objects of a metrics file; a file that is not there reads as empty, and a line cut
    short (a run killed while writing it) is left out."""
    records = MetricsRecords()
    if not os.path.exists(path):
        return records
    by_kind = {ITERATION: records.iterations, VALIDATION: records.validations, ROLLBACK: records.rollbacks}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == SUMMARY:
                records.summary = record
            elif record.get("kind") == STARTUP:
                records.startup = record
            elif record.get("kind") in by_kind:
                by_kind[record["kind"]].append(record)
    return records
