"""Pacing of the engine's background work: in production it does nothing; tests inject holds.

The engine's rules (supersede, orphan, fence) are the same with any pacing; a pacing only makes
one side wait at a named point, so that a test's outcome follows from the rules and not from how
fast a loaded machine runs the flusher. Tests arm it through the environment
(``checkpointing.base.faults``: ``GPT_CKPT_HOLD`` and ``GPT_CKPT_DISK_GATE``), which the flusher
process inherits; :func:`flusher_pacing` and :func:`training_pacing` read it once.
"""

from __future__ import annotations

import os
import time

from checkpointing.base import faults
from checkpointing.engine import control_block as cb


class FlusherPacing:
    """The flusher's side; this production version never waits and supersedes as the rules say."""

    may_supersede = True

    def before_write(self, job_id: int, slot_index: int, version: int) -> None:
        """Before a flush writes its first byte."""

    def after_read(self, job_id: int, slot_index: int, before: int, after: int) -> None:
        """Each time the flush has read more shards of its slot (``before`` -> ``after``)."""


class HeldFlusherPacing(FlusherPacing):
    """``GPT_CKPT_HOLD=flush``: a flush starts writing a slot only once a fence waits on that
    slot (or the engine drains), and nothing is superseded. ``GPT_CKPT_HOLD=read:N``: a flush
    stops after reading N shards until a fence waits on its slot (or the engine drains).
    ``GPT_CKPT_DISK_GATE=PATH``: each flush waits until ``PATH`` (``{rank}`` in it becomes the
    rank) exists: a stuck disk that the test frees."""

    def __init__(self, block: cb.ControlBlock, rank: int):
        self.block = block
        self.hold_flush = faults.holds("flush")
        self.may_supersede = not self.hold_flush
        self.read_pause = faults.hold_value("read")
        gate = os.environ.get(faults.DISK_GATE_ENV)
        self.gate = gate.replace("{rank}", str(rank)) if gate else None

    def _until(self, done) -> None:
        while not done():
            time.sleep(0.002)

    def _fence_on(self, slot_index: int):
        return lambda: self.block[cb.FENCE_BLOCKED] == slot_index + 1 or self.block[cb.DRAINING]

    def before_write(self, job_id: int, slot_index: int, version: int) -> None:
        if self.gate:
            self._until(lambda: os.path.exists(self.gate))
        if self.hold_flush:
            self._until(self._fence_on(slot_index))

    def after_read(self, job_id: int, slot_index: int, before: int, after: int) -> None:
        if self.read_pause is not None and before < self.read_pause <= after:
            self._until(self._fence_on(slot_index))


def flusher_pacing(block: cb.ControlBlock, rank: int) -> FlusherPacing:
    if faults.holds("flush") or faults.hold_value("read") is not None or os.environ.get(faults.DISK_GATE_ENV):
        return HeldFlusherPacing(block, rank)
    return FlusherPacing()


class TrainingPacing:
    """The training thread's side; production: ``request`` never waits for background work."""

    def holds_request(self, version: int) -> bool:
        return False

    def holds_step(self, iteration: int) -> bool:
        """Whether the zero-copy step of ``iteration`` first waits for every requested version to be in L0."""
        return False


class HeldRequests(TrainingPacing):
    """``GPT_CKPT_HOLD=request[:N]``: ``request(N)`` first waits until version N-1 is in L0 and
    every flush queued before it has finished (no version is superseded); a zero-copy step N
    first waits until every requested version is in L0."""

    def holds_request(self, version: int) -> bool:
        return faults.holds("request", version)

    def holds_step(self, iteration: int) -> bool:
        return faults.holds("request", iteration)


def training_pacing() -> TrainingPacing:
    return HeldRequests() if faults.holds("request") else TrainingPacing()
