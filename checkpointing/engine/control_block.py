"""The words the training process and its flusher process share, in one small shared-memory file.

The flusher (``checkpointing.engine.flusher``) reports its progress here and the training thread reads
it without a message, a lock or a syscall: a fence checks how far a flush has read a slot by
reading one word. Every word is an aligned 64-bit integer, written by one side only, so a
reader never sees half a value (aligned 8-byte stores are single instructions). Where the
reader needs two facts to agree (which job a progress count belongs to), they are packed into
one word.

The one exchange both sides write to is the *claim* of a flush job against its *orphaning*: the
flusher claims job k (from then on it may write the slot's bytes out), the training thread may
orphan a queued job (take its slot for a newer version). Both happen under ``flock`` of the
file, so exactly one of them wins.

The file lives beside the pool's slots (``<pool dir>/gptckpt-<job>-r<rank>.ctl``, mode 0600,
this user's: created with ``private_files.create_new``, checked before it is opened again).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os

from checkpointing.base import private_files

ORPHAN_RING = 1 << 14
"""Orphan marks are kept for this many job ids (a mark holds the id it is for); the engine never
lets that many flush jobs be outstanding."""

PROGRESS_BITS = 24
"""A progress word is ``job_id << PROGRESS_BITS | shards_read``."""

# Word indices. W: written by the training process; F: written by the flusher.
PID = 0              # F: the flusher's pid, once it runs
HEARTBEAT_NS = 1     # F: time.monotonic_ns() of its last sign of life (about once a second)
CPU_NS = 2           # F: its process CPU clock (time.process_time_ns()), updated with the heartbeat and after each job
DESCRIBED = 3        # F: the newest request whose slot description (the L0 commit) is written
CLAIMED = 4          # F: the newest flush job claimed (under the lock)
DONE = 5             # F: the newest flush job finished (written, skipped or failed)
PROGRESS = 6         # F: (job << PROGRESS_BITS) | shards of the job's slot read so far
FENCE_BLOCKED = 7    # W: 1 + the slot a fence is waiting on, 0 when none (GPT_CKPT_HOLD=flush lets its flush go)
DRAINING = 8         # W: 1 once the engine drains (held flushes go on)
FLUSH_ALIVE_NS = 9   # F: time.monotonic_ns() when the flush loop last moved (a piece written, a job taken)
_ORPHANS = 16        # W: ORPHAN_RING words, word _ORPHANS + (job % ORPHAN_RING) = job once job is orphaned
WORDS = _ORPHANS + ORPHAN_RING


class ControlBlock:
    """The mapped words; ``block[i]`` reads and ``block[i] = v`` writes word ``i``."""

    def __init__(self, path: str, create: bool):
        self.path = path
        if create:
            if os.path.lexists(path):
                os.unlink(path)  # a previous run's: its words mean nothing now (unlink follows no link)
            os.close(private_files.create_new(path, 0o600))
            os.truncate(path, WORDS * 8)
        else:
            private_files.check(path)
        self._fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._map = mmap.mmap(self._fd, WORDS * 8)
        self._words = memoryview(self._map).cast("q")

    def __getitem__(self, index: int) -> int:
        return self._words[index]

    def __setitem__(self, index: int, value: int) -> None:
        self._words[index] = value

    @contextlib.contextmanager
    def locked(self):
        """The claim/orphan lock (``flock`` of the file: between processes)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- orphan marks (training process, under the lock) ---------------------------------------
    def mark_orphaned(self, job: int) -> None:
        self._words[_ORPHANS + job % ORPHAN_RING] = job

    def is_orphaned(self, job: int) -> bool:
        return self._words[_ORPHANS + job % ORPHAN_RING] == job

    # -- progress --------------------------------------------------------------------------------
    def set_progress(self, job: int, shards_read: int) -> None:
        self._words[PROGRESS] = (job << PROGRESS_BITS) | shards_read

    def shards_read(self, job: int) -> int:
        """How many leading shards of its slot flush job ``job`` has read (0 if it is not the
        one running: not started, or its word already belongs to a later job)."""
        word = self._words[PROGRESS]
        return word & ((1 << PROGRESS_BITS) - 1) if word >> PROGRESS_BITS == job else 0

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)
