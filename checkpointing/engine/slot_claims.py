"""Which host-pool slot a copied version gets: a free one, else one taken from superseded queued
flushes (orphaning them), applied under the control block's lock (``checkpointing.engine.flush_rules``
has the rules themselves; this module applies them to the engine's records and the shared block).

The flusher claims a job under the same lock, so for each queued job exactly one of the two
wins: the flusher writes it, or the trainer orphans it and the flusher skips it.
"""

from __future__ import annotations

from typing import Collection, Mapping

from checkpointing.engine import control_block as cb
from checkpointing.engine import flush_rules
from checkpointing.engine.flush_rules import JobState, SlotState


def free_or_reclaimed(slots: list[SlotState], jobs: Mapping[int, JobState], block: cb.ControlBlock,
                      levels: Collection[str], version: int) -> SlotState | None:
    """A slot for ``version`` (due on ``levels``) now, or None: wait. ``jobs``: the flush jobs
    sent and not finished, by id; the ones it orphans are marked in ``block`` and released."""
    if jobs and max(jobs) - block[cb.DONE] >= cb.ORPHAN_RING // 2:
        return None  # too many jobs outstanding for the orphan marks: wait for the flusher
    slot = flush_rules.free_slot(slots)
    if slot is not None:
        return slot
    with block.locked():  # the flusher cannot claim a job meanwhile
        claimed = block[cb.CLAIMED]
        for job in jobs.values():
            job.claimed = job.id <= claimed
        found = flush_rules.reclaimable(jobs.values(), set(levels), version)
        if found is None:
            return None
        slot, orphans = found
        for job in orphans:
            block.mark_orphaned(job.id)
            job.orphaned = job.released = True
            slot.pins -= 1
    return slot


def usable_once_described(slots: list[SlotState], jobs: Mapping[int, JobState], levels: Collection[str],
                          version: int) -> bool:
    """Whether a slot whose description is being written would then be free or taken: the wait
    for a slot is then short (a description), not backpressure."""
    landing = [s for s in slots if s.landing]
    for slot in landing:
        slot.landing = False
    try:
        return bool(landing) and (flush_rules.free_slot(slots) is not None or flush_rules.reclaimable(
            jobs.values(), set(levels), version) is not None)
    finally:
        for slot in landing:
            slot.landing = True
