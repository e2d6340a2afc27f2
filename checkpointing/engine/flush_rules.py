"""The flush queue's rules, as pure functions over plain records (no engine, no threads, no I/O).

- **Supersede.** A queued flush of version v to a level is skipped when a newer version for the
  same level is queued behind it before it starts (selective flushing), unless it is forced (the
  end of training). Every rank applies the rule to its own view and the ranks then agree (any
  rank's "skip" skips it everywhere: ``checkpointing.engine.flusher``).
- **Orphan / reclaim.** When a new version finds no free slot, it may take the slot of queued
  jobs it supersedes (same level, older, not started, not forced); those jobs are *orphaned*:
  they stay in the queue, so every rank sees the same job sequence, and are skipped everywhere.
- **Which slot.** A free slot is one no unfinished job reads and whose bytes are not being
  produced; the oldest version is reused first. A zero-copy step writes a slot other than the
  current version's, preferably one no flush reads.
- **Fence progress.** A flush writes a slot's pieces in order; shard s may be overwritten once
  every piece of shard s is written: the suffix minimum of the pieces' shards.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(eq=False)
class SlotState:
    """What the engine knows of one pool slot (the bytes are in ``checkpointing.storage.host_pool``)."""

    index: int
    version: int | None = None
    """The version its bytes are (or are becoming); None: nothing."""
    pins: int = 0
    """Unfinished flush jobs that read it."""
    landing: bool = False
    """Its bytes or its description (the L0 commit) are not complete yet."""


@dataclass(eq=False)
class JobState:
    """One flush of one version to one level, as both processes track it."""

    id: int
    level: str
    version: int
    slot: SlotState
    forced: bool = False
    orphaned: bool = False
    released: bool = False
    claimed: bool = field(default=False)
    """Known to be started by the flusher (it can no longer be orphaned)."""


def supersedes(job: JobState, later: Iterable[JobState], may_supersede: bool = True) -> bool:
    """Whether ``job`` is skipped: orphaned, or (not forced) a newer version of its level is
    queued after it. ``may_supersede`` False (a test's pacing) keeps every unorphaned job."""
    if job.orphaned:
        return True
    if job.forced or not may_supersede:
        return False
    return any(j.level == job.level and j.version > job.version for j in later)


def free_slot(slots: Sequence[SlotState]) -> SlotState | None:
    """An unpinned slot whose bytes are complete: never used first, else the oldest version."""
    free = [s for s in slots if s.pins == 0 and not s.landing]
    if not free:
        return None
    return min(free, key=lambda s: -1 if s.version is None else s.version)


def reclaimable(jobs: Iterable[JobState], due: set[str], version: int) -> tuple[SlotState, list[JobState]] | None:
    """The oldest slot held only by queued jobs that ``version`` supersedes (their level in
    ``due``, an older version, not claimed, not forced), and those jobs; None if there is none."""
    jobs_of: dict[SlotState, list[JobState]] = {}
    for job in jobs:
        if not job.released:
            jobs_of.setdefault(job.slot, []).append(job)
    for slot in sorted(jobs_of, key=lambda s: s.version if s.version is not None else -1):
        held = jobs_of[slot]
        if slot.landing or len(held) != slot.pins:
            continue
        if all(j.level in due and j.version < version and not (j.claimed or j.forced) for j in held):
            return slot, held
    return None


def zero_copy_target(slots: Sequence[SlotState], current: SlotState | None) -> SlotState | None:
    """The slot a zero-copy step writes: not the current version's and not landing (its
    description would describe bytes the step overwrites); preferably unpinned, then never used,
    then the oldest. None if every other slot is landing (the caller waits a moment)."""
    others = [s for s in slots if s is not current and not s.landing]
    if not others:
        return None
    return min(others, key=lambda s: (s.pins > 0, s.version is not None, s.version or 0))


def shards_read_after_pieces(shard_starts: Sequence[int], piece_starts: Sequence[int]) -> list[int]:
    """For each piece i (in write order), how many leading shards are wholly read once it is
    written: the lowest shard of any piece still to come (``len(shard_starts)`` after the last)."""
    shard_of = [bisect.bisect_right(shard_starts, start) - 1 for start in piece_starts]
    read, lowest_to_come = [0] * len(shard_of), len(shard_starts)
    for i in range(len(shard_of) - 1, -1, -1):
        read[i] = lowest_to_come
        lowest_to_come = min(lowest_to_come, shard_of[i])
    return read
