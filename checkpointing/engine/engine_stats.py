"""What the checkpoint engine did and what it cost: counters the trainer reports (TensorBoard,
the end-of-run summary). Written by the training thread only (the flusher's figures arrive as
messages and shared words, ``checkpointing.engine.checkpoint_engine``)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class FlushRecord:
    level: str
    version: int
    bytes: int
    seconds: float
    error: str | None = None
    flusher_cpu_seconds: float | None = None
    """The flusher's CPU since it was ready, when this flush ended."""


@dataclass
class EngineStats:
    stall_seconds: float = 0.0
    stall_by_iteration: dict[int, float] = field(default_factory=dict)
    stall_by_shard: list[float] = field(default_factory=list)
    fence_waits: int = 0
    backpressure_waits: int = 0
    """Requests that waited because every slot was pinned by flushes (the pool is full)."""
    description_waits: int = 0
    """Requests that waited for the flusher to finish writing a slot's description (the L0 commit)
    before reusing the slot: short, but not nothing."""
    copies: int = 0
    """Versions committed to L0 (described), copied or zero-copy."""
    requests: int = 0
    request_seconds: float = 0.0
    """Wall time the training thread spent inside ``request`` (capture and hand-off of the small
    state, slot claim, a copied snapshot's copy on a CPU, backpressure waits)."""
    fence_seconds: float = 0.0
    """Wall time the training thread spent waiting in fences."""
    copy_seconds: float = 0.0
    last_copy_seconds: float = 0.0
    """From request to the L0 commit of the last version."""
    bytes_copied: int = 0
    """Bytes copied into the pool for snapshots (0 with zero-copy snapshots, except a version
    requested without a step before it, e.g. right after a load)."""
    flushes: list[FlushRecord] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    flusher_cpu_seconds: float = 0.0
    """CPU time of the flusher process since it was ready (its process clock, from the shared
    control block); its start-up is :attr:`flusher_start_cpu_seconds`."""
    flusher_start_cpu_seconds: float = 0.0
    """CPU time the flusher took to start (interpreter, torch, its group)."""
    flusher_start_seconds: float = 0.0
    """From starting the flusher process to its group being up."""
    flusher_ready_wait_seconds: float = 0.0
    """What the training thread waited for the flusher to be ready (it starts beside the load and
    the first step; the first message to it waits only if it is not up yet)."""
    flusher_rss_bytes: int = 0
    """The flusher's unshared resident memory once started (its private pages: neither the pool's nor the
    trainer's it shares copy-on-write when forked from the template)."""

    def flusher_cpu_since_ready(self, clock: float) -> float:
        """The flusher's CPU since it was ready, from its process ``clock`` (seconds)."""
        return max(0.0, clock - self.flusher_start_cpu_seconds)

    @property
    def training_thread_seconds(self) -> float:
        """Time the training thread spent in the engine's entry points (request and fence waits):
        its whole checkpoint work, since the process runs no checkpoint thread."""
        return self.request_seconds + self.fence_seconds

    @property
    def cpu_seconds(self) -> float:
        """CPU time of checkpoint work outside training's own path: the flusher process's."""
        return self.flusher_cpu_seconds


def machine_cpu_times() -> tuple[float, float, float] | None:
    """(idle, steal, total) jiffies of the whole machine since boot (``/proc/stat``), or None
    where there is no ``/proc/stat``. Two readings give the machine's idle and steal share between
    them: what a background process took shows as idle the machine no longer has."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0.0
    return idle, steal, sum(fields[:8])


def idle_and_steal(before, after) -> tuple[float, float] | None:
    """The machine's idle and steal shares (0..1) between two :func:`machine_cpu_times`."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    total = after[2] - before[2]
    return (after[0] - before[0]) / total, (after[1] - before[1]) / total
