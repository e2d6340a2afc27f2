"""Requested versions on their way into L0, and the order in which the flusher learns of them.

A version is *landing* from its request until the flusher confirms its description (the L0
commit). Its description, then its flush jobs, go to the flusher once its bytes are in its slot
(at once on a CPU or with zero-copy snapshots; a CUDA copy when its events say so), in request
order: so every rank's flusher sees the same job sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from checkpointing.engine import flush_rules
from checkpointing.engine.protocol import Describe, FlushJob
from checkpointing.engine.snapshots import CopiedSnapshots


@dataclass(eq=False)
class PendingVersion:
    """A requested version on its way into L0."""

    slot: flush_rules.SlotState
    version: int
    small_state: dict
    requested: float
    """When it was requested (``time.perf_counter``)."""
    copy: object
    """A copy in flight (CUDA), or None."""
    jobs: list = field(default_factory=list)
    """Its flush-job messages, sent after its description."""
    sent: bool = False
    """Its description (and jobs) went to the flusher."""


class Landing:
    """The versions landing, by request seq, in request order."""

    def __init__(self, send: Callable[[Describe | FlushJob], None], snapshots: CopiedSnapshots | None):
        """``send``: a message to the flusher; ``snapshots``: the copies in flight (None: zero-copy)."""
        self._send = send
        self._snapshots = snapshots
        self._pending: dict[int, PendingVersion] = {}
        self._newest: tuple[int, int] | None = None
        """(version, seq) of the newest request: the flusher keeps its small state."""

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, seq: int, pending: PendingVersion) -> None:
        self._pending[seq] = pending
        self._newest = (pending.version, seq)

    def newest_seq(self, version: int) -> int | None:
        """The request seq of ``version`` if it is the newest requested version, else None."""
        return self._newest[1] if self._newest is not None and self._newest[0] == version else None

    def hand_over(self, wait: bool = False) -> None:
        """Send every version whose bytes are in its slot: its description, then its jobs. Stops
        at the first copy still in flight (later versions land after it), unless ``wait``."""
        for seq, pending in self._pending.items():
            if pending.sent:
                continue
            if pending.copy is not None:
                if wait:
                    self._snapshots.wait_landed(pending.copy)
                elif not self._snapshots.landed(pending.copy):
                    return
            self._send(Describe(seq, pending.slot.index, pending.version, pending.small_state))
            for message in pending.jobs:
                self._send(message)
            pending.sent, pending.jobs = True, []

    def add_jobs(self, seq: int, messages: list[FlushJob]) -> bool:
        """Queue job messages behind request ``seq``'s description if it has not gone yet;
        False: it has (send them now)."""
        pending = self._pending.get(seq)
        if pending is None or pending.sent:
            return False
        pending.jobs += messages
        return True

    def described(self, seq: int) -> PendingVersion:
        """The flusher wrote request ``seq``'s description (or failed to): it is no longer landing."""
        return self._pending.pop(seq)
