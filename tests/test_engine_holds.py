"""``GPT_CKPT_HOLD`` (``checkpointing.faults``): the holds that make the outcome of a trainer test
independent of the machine's speed. ``request`` makes every due version reach its level (nothing
is superseded) and fixes what L0 and the levels hold when training passes an iteration; ``copy``
makes the step after each request wait at a fence. Both are checked here against the engine's
own record, with a disk slower than the steps (which, without the hold, supersedes versions)."""

import time

import pytest
import torch

from checkpointing import faults
from checkpointing.reader import CheckpointReader
from tests.helpers import SHARDS, SyntheticState, make_engine, shared_memory_removed_after


@pytest.fixture(autouse=True)
def remove_pools():
    with shared_memory_removed_after():
        yield


def test_hold_spec_names_points_and_iterations(monkeypatch):
    monkeypatch.delenv(faults.HOLD_ENV, raising=False)
    assert not faults.holds("request") and not faults.holds("copy", 3)
    monkeypatch.setenv(faults.HOLD_ENV, "request, copy:3")
    assert faults.holds("request") and faults.holds("request", 7)
    assert faults.holds("copy") and faults.holds("copy", 3) and not faults.holds("copy", 4)
    assert not faults.holds("flush")


def test_request_hold_flushes_every_version_before_the_next_request(tmp_path, single_process_group, monkeypatch):
    monkeypatch.setenv(faults.HOLD_ENV, "request")
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=1)
    engine.flush_hook = lambda level, version: time.sleep(0.05)  # a disk slower than the steps
    expected, seen = {}, {}
    for it in range(1, 7):
        state.optimizer_step(engine)
        expected[it] = {k: v.clone() for k, v in state.arrays.items()}
        engine.request(it)
        # when request(N) returns, N-1 is in L0 and committed on its level
        seen[it] = (engine.stats.copies, [f.version for f in engine.stats.flushes],
                    (tmp_path / "l2" / f"iter_{it - 1:07d}" / ".metadata").exists())
    engine.close(drain=True)
    assert seen == {it: (it - 1, list(range(1, it)), it > 1) for it in range(1, 7)}, seen
    assert [f.version for f in engine.stats.flushes if f.error is None] == [1, 2, 3, 4, 5, 6]
    assert sum(engine.stats.skipped.values()) == 0 and engine.stats.backpressure_waits == 0
    for it, arrays in expected.items():
        loaded = {k: torch.empty_like(v) for k, v in arrays.items()}
        CheckpointReader(str(tmp_path / "l2" / f"iter_{it:07d}")).read_pieces(state.save_pieces, loaded)
        assert all(torch.equal(loaded[k], arrays[k]) for k in arrays), f"version {it}"


def test_copy_hold_makes_every_step_after_a_request_wait_at_a_fence(tmp_path, single_process_group, monkeypatch):
    monkeypatch.setenv(faults.HOLD_ENV, "copy")
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=10**6)  # L0 only
    for it in range(1, 7):
        state.optimizer_step(engine)
        engine.request(it)
    engine.close(drain=True)  # the last version's copy, which no step waits for, goes on at the end
    assert engine.stats.copies == 6
    # the first shard's fence of steps 2-6 waited every time (later shards only if they caught up)
    assert engine.stats.stall_by_shard[0] > 0 and engine.stats.fence_waits >= 5
    assert all(engine.stats.stall_by_iteration.get(it, 0) > 0 for it in range(2, 7)), engine.stats.stall_by_iteration
    (slot,) = [s for s in engine.pool.slots if s.version == 6]
    assert all(torch.equal(slot.arrays[k], v) for k, v in state.arrays.items()), "the last version, copied at close"


def test_copy_hold_at_one_iteration_holds_only_that_version(tmp_path, single_process_group, monkeypatch):
    monkeypatch.setenv(faults.HOLD_ENV, "copy:3")
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=10**6)
    waits_in = {}
    for it in range(1, 6):
        before = engine.stats.fence_waits
        state.optimizer_step(engine)
        waits_in[it] = engine.stats.fence_waits - before
        engine.request(it)
        if it != 3:  # every other version is copied before the next step
            engine.wait_idle(drain=False)
    engine.close(drain=True)
    assert waits_in == {1: 0, 2: 0, 3: 0, 4: waits_in[4], 5: 0} and waits_in[4] >= 1, waits_in
    assert len(engine.stats.stall_by_shard) == SHARDS


def test_without_a_hold_no_fence_calls_back(tmp_path, single_process_group, monkeypatch):
    monkeypatch.delenv(faults.HOLD_ENV, raising=False)
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state)
    assert engine.copier.on_block is None
    engine.close(drain=True)
