"""What the L0 pool holds, as the checkpoint manager and a live rollback use it: the engine's
versions in host memory, restored into the state, kept or dropped.

A part of :class:`~checkpointing.engine.checkpoint_engine.CheckpointEngine` (its base class),
kept apart because none of it runs beside training: it is called before training starts, after
a load, or inside a live rollback once ``wait_idle`` has drained the flusher.
"""

from __future__ import annotations

from checkpointing.engine import flush_rules
from checkpointing.format.items import CheckpointableState
from checkpointing.storage.host_pool import HostPool


class HeldVersions:
    """The engine's L0 versions. Uses the engine's ``pool``, ``slots`` (its view of each slot:
    pins, landing), ``state``, ``zero_copy``, ``rank``, ``_current`` (zero-copy: the slot the state
    lives in) and ``_poll`` (read the flusher's answers)."""

    pool: HostPool
    slots: list[flush_rules.SlotState]
    state: CheckpointableState
    zero_copy: bool
    rank: int
    _current: flush_rules.SlotState | None

    def _poll(self) -> None:
        raise NotImplementedError

    def held_versions(self) -> list[int]:
        """Versions this rank holds in L0, committed (copied and described) in the state's
        layout; a previous run's snapshots that survived in shared memory are among them."""
        self._poll()
        return sorted(s.version for s in self.pool.slots
                      if s.version is not None and s.small_state is not None and s.layout == self.layout)

    def held_versions_written(self) -> list[tuple[int, float]]:
        """(version, when its description was written) of :meth:`held_versions`: a rollback's
        record tells by the time which of them a rollback abandoned."""
        held = set(self.held_versions())
        return sorted((s.version, s.described_at()) for s in self.pool.slots if s.version in held)

    def restore(self, version: int) -> dict:
        """Copy L0 ``version`` into the state's live arrays; returns its small state (the
        ``common`` item is in rank 0's only). Call before training starts."""
        slot = next((s for s in self.pool.slots if s.version == version and s.small_state is not None), None)
        if slot is None:
            raise ValueError(f"iteration {version} is not held in L0 on this rank")
        for name, live in self.state.arrays.items():
            live.copy_(slot.arrays[name])
        return dict(slot.small_state)

    def keep_only(self, version: int | None) -> None:
        """Forget every L0 version but ``version`` (after a load: older runs' snapshots are stale,
        and a fine-tuning run's versions restart from 0)."""
        for slot, host in zip(self.slots, self.pool.slots):
            if host.version != version and slot.pins == 0 and not slot.landing:
                host.invalidate()
                slot.version = None

    # -- a live rollback (``checkpointing.recovery.live_rollback``), after ``wait_idle`` ---------------
    def restore_live(self, version: int) -> dict:
        """Make L0 ``version`` the running state; returns its small state (``common`` in rank 0's
        only). Zero-copy: the state takes the slot's arrays as its own, no byte is copied, and the
        next step writes out of place, so the version stays in L0. Copied: the slot is copied
        into the live arrays."""
        index = next((i for i, s in enumerate(self.pool.slots) if s.version == version and s.small_state is not None),
                     None)
        if index is None:
            raise ValueError(f"iteration {version} is not held in L0 on rank {self.rank}")
        host = self.pool.slots[index]
        if self.zero_copy:
            self.state.adopt_arrays(host.arrays)
            self._current = self.slots[index]
        else:
            for name, live in self.state.arrays.items():
                live.copy_(host.arrays[name])
        return dict(host.small_state)

    def detach_for_read(self) -> None:
        """Zero-copy, before a read from disk into the state: the state moves to a slot holding
        no version the read must keep (the current version's slot is left as it is, so a failed
        read can go back to it with :meth:`restore_live`). Copied: nothing to do (the live arrays
        are not a slot)."""
        if not self.zero_copy:
            return
        target = flush_rules.zero_copy_target(self.slots, self._current)
        if target is None:
            raise RuntimeError("no host-pool slot is free after the drain")  # wait_idle leaves none landing
        target.version = None
        self.pool.slots[target.index].invalidate()
        self.state.adopt_arrays(self.pool.slots[target.index].arrays)
        self._current = target

    def drop_after(self, version: int) -> list[int]:
        """Forget every L0 version after ``version`` (a branch a live rollback abandoned; their
        slots are reused by the new branch); returns the versions dropped."""
        dropped = []
        for slot, host in zip(self.slots, self.pool.slots):
            if host.version is not None and host.version > version and slot.pins == 0 and not slot.landing:
                dropped.append(host.version)
                host.invalidate()
                slot.version = None
        return sorted(dropped)
