"""The flush queue's rules on plain records: supersede, orphan/reclaim, slot choice, fence progress."""

from checkpointing.engine.flush_rules import (
    JobState,
    SlotState,
    free_slot,
    reclaimable,
    shards_read_after_pieces,
    supersedes,
    zero_copy_target,
)


def _job(id, level, version, slot, **kw):
    job = JobState(id, level, version, slot, **kw)
    slot.pins += 1
    return job


def test_a_newer_version_of_the_same_level_supersedes_unless_forced_or_paced():
    a, b = SlotState(0, 1), SlotState(1, 2)
    old, new, other = _job(1, "L2", 1, a), _job(2, "L2", 2, b), _job(3, "L1", 2, b)
    assert supersedes(old, [new])
    assert not supersedes(old, [other]), "another level's newer version does not"
    assert not supersedes(new, [old]), "an older one behind it does not"
    assert not supersedes(JobState(4, "L2", 1, a, forced=True), [new]), "a final save is never superseded"
    assert not supersedes(old, [new], may_supersede=False), "a test's pacing keeps every version"
    assert supersedes(JobState(5, "L2", 1, a, orphaned=True), [], may_supersede=False), "an orphan is always skipped"


def test_free_slot_takes_unused_then_oldest_and_never_a_pinned_or_landing_one():
    slots = [SlotState(0, 5), SlotState(1, 3), SlotState(2, None), SlotState(3, 1)]
    assert free_slot(slots) is slots[2]
    slots[2].landing = True
    assert free_slot(slots) is slots[3]
    slots[3].pins = 1
    assert free_slot(slots) is slots[1]
    for s in slots:
        s.pins = 1
    assert free_slot(slots) is None


def test_reclaim_takes_the_oldest_slot_held_only_by_superseded_unstarted_jobs():
    a, b, c = SlotState(0, 1), SlotState(1, 2), SlotState(2, 3)
    jobs = [_job(1, "L2", 1, a), _job(2, "L2", 2, b), _job(3, "L2", 3, c)]
    assert reclaimable(jobs, {"L2"}, 4) == (a, [jobs[0]])
    jobs[0].claimed = True  # the flusher started it: its slot cannot be taken
    assert reclaimable(jobs, {"L2"}, 4) == (b, [jobs[1]])
    assert reclaimable(jobs, {"L1"}, 4) is None, "a version not due on that level supersedes nothing there"
    jobs[1].forced = jobs[2].forced = True
    assert reclaimable(jobs, {"L2"}, 4) is None, "final saves keep their slots"
    d = SlotState(3, 5)
    both = [_job(4, "L2", 5, d), _job(5, "L1", 5, d)]
    assert reclaimable(both, {"L2"}, 6) is None, "a job of a level the new version does not supersede holds it"
    assert reclaimable(both, {"L1", "L2"}, 6) == (d, both)
    d.landing = True
    assert reclaimable(both, {"L1", "L2"}, 6) is None, "a slot whose description is being written is not taken"


def test_zero_copy_writes_another_slot_preferring_unpinned_then_unused_then_oldest():
    current = SlotState(0, 9)
    slots = [current, SlotState(1, 7), SlotState(2, None), SlotState(3, 4)]
    assert zero_copy_target(slots, current) is slots[2]
    slots[2].pins = 1
    assert zero_copy_target(slots, current) is slots[3]
    slots[3].landing = True
    assert zero_copy_target(slots, current) is slots[1]
    slots[1].pins = 1
    assert zero_copy_target(slots, current) in (slots[1], slots[2])  # both read: the step's fences wait
    slots[1].landing = slots[2].landing = True
    assert zero_copy_target(slots, current) is None


def test_a_shard_counts_as_read_only_once_its_last_piece_is_written():
    # Two arrays, pieces per array in shard order (as the trainer lists them): shard s of the first
    # array is written early, of the second late; shard s is read once both are.
    shard_starts = [0, 10, 20]
    pieces = [0, 10, 20, 0, 10, 20]
    assert shards_read_after_pieces(shard_starts, pieces) == [0, 0, 0, 1, 2, 3]
    assert shards_read_after_pieces(shard_starts, [0, 5, 10, 20]) == [0, 1, 2, 3], "shard 0 read after its second piece"
