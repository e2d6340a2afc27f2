"""Zero-copy snapshots on a synthetic state, in one process: each step writes the next version
into a pool slot, which is the snapshot. Versions equal the state after their step; a fence waits
only for the shard a flush has not read; no byte is copied; the pool stays within its budget."""

import time

import pytest
import torch

from checkpointing.format.reader import CheckpointReader
from tests.helpers import SyntheticState, make_engine

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pools_removed")]


def _stored(tmp_path, version, state):
    reader = CheckpointReader(str(tmp_path / "l2" / f"iter_{version:07d}"))
    out = {name: torch.empty_like(a) for name, a in state.arrays.items()}
    reader.read_pieces(state.save_pieces, out)
    return out


def test_every_version_is_the_state_after_its_step_with_fences_hit(tmp_path, single_process_group, monkeypatch):
    # Held: a flush writes a slot only once a step is blocked in a fence on it; with two slots
    # every step from the third waits for the flush of the version two back, shard by shard.
    monkeypatch.setenv("GPT_CKPT_HOLD", "flush")
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, zero_copy=True)
    for version in range(1, 7):
        state.optimizer_step(engine)
        engine.request(version)
    engine.close()
    assert engine.stats.fence_waits >= 4, "steps 3-6 wait for the flush of the version two back"
    assert engine.stats.bytes_copied == 0, "zero-copy: no byte copied beside the step's own writes"
    assert sorted(f.version for f in engine.stats.flushes) == [1, 2, 3, 4, 5, 6]
    for version in range(1, 7):
        expected = SyntheticState.after_steps(version)
        for name, values in _stored(tmp_path, version, state).items():
            assert torch.equal(values, expected.arrays[name]), (version, name)


def test_a_fence_waits_only_for_the_shard_a_flush_has_not_read(tmp_path, single_process_group, monkeypatch):
    """The flush of version 1 (in the flusher process) stops after reading shards 0-1 until a
    fence waits on its slot (``GPT_CKPT_HOLD=read:2``); step 3 writes that slot: shards 0 and 1 go
    on at once, shard 2 waits until the flush has read it."""
    monkeypatch.setenv("GPT_CKPT_HOLD", "read:2")
    state = SyntheticState(shards=4)
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, zero_copy=True)
    state.optimizer_step(engine)  # version 1 into slot A
    engine.request(1)
    deadline = time.monotonic() + 60
    while engine.flush_progress() != (1, 2):  # version 1's flush (job 1) started and paused: not superseded
        assert time.monotonic() < deadline, f"the flush never paused at 2 shards: {engine.flush_progress()}"
        engine.active()
        time.sleep(0.005)
    state.optimizer_step(engine)  # version 2 into slot B: nothing reads B, no wait
    engine.request(2)  # B holds a version now: step 3 writes out of place, into A
    assert engine.stats.fence_waits == 0
    state.optimizer_step(engine)  # version 3 into A
    engine.close()
    waited = engine.stats.stall_by_shard
    assert waited[0] == 0 and waited[1] == 0, waited
    assert waited[2] > 0 and engine.stats.fence_waits >= 1, waited
    expected = SyntheticState.after_steps(1, shards=4)
    for name, values in _stored(tmp_path, 1, state).items():
        assert torch.equal(values, expected.arrays[name]), name


def test_steps_between_requests_update_in_place_and_versions_stay_exact(tmp_path, single_process_group):
    """--save-interval 3: only the step after a request writes out of place (into another slot);
    the two after it update that slot in place, since no version lives there. Every requested
    version is still the state of its step, bit for bit, in L0 and on disk."""
    state = SyntheticState(shards=3)
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=3, interval=3, zero_copy=True)
    in_place, begin_step = [], engine.begin_step
    engine.begin_step = lambda: in_place.append(out := begin_step()) or out
    for version in range(1, 10):
        state.optimizer_step(engine)
        if version % 3 == 0:
            engine.request(version, force_flush=True)  # each one to disk (none superseded)
            held = [s for s in engine.pool.slots if s.version == version]
            assert len(held) == 1 and all(held[0].arrays[k].data_ptr() == a.data_ptr() for k, a in state.arrays.items())
    engine.close()
    assert [out is None for out in in_place] == [False, True, True, False, True, True, False, True, True]
    assert engine.stats.bytes_copied == 0
    for version in (3, 6, 9):
        expected = SyntheticState.after_steps(version, shards=3)
        for name, values in _stored(tmp_path, version, state).items():
            assert torch.equal(values, expected.arrays[name]), (version, name)
    slot = next(s for s in engine.pool.slots if s.version == 9)
    for name, values in slot.arrays.items():
        assert torch.equal(values, SyntheticState.after_steps(9, shards=3).arrays[name]), name


def test_the_pool_stays_within_its_budget_over_200_checkpoints(tmp_path, single_process_group):
    state = SyntheticState(shard_numel=1 << 12)
    one_slot = sum(a.numel() * a.element_size() for a in state.arrays.values())
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=3, interval=50, budget=3 * one_slot + 8192,
                            zero_copy=True)
    files = None
    for version in range(1, 201):
        state.optimizer_step(engine)
        engine.request(version)
        if version == 10:
            files = len(engine.pool.slots)
    engine.close()
    assert len(engine.pool.slots) == files == 3 and engine.pool.bytes <= 3 * one_slot + 8192
    assert engine.stats.bytes_copied == 0 and engine.stats.copies == 200
    expected = SyntheticState.after_steps(200, shard_numel=1 << 12)
    for name, values in _stored(tmp_path, 200, state).items():
        assert torch.equal(values, expected.arrays[name]), name


def test_a_request_without_a_step_copies_once(tmp_path, single_process_group):
    """Right after a load no step has written a slot yet: the version is copied in, once."""
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, zero_copy=True)
    engine.request(0, force_flush=True)  # forced: never superseded by version 1
    state.optimizer_step(engine)
    engine.request(1)
    engine.close()
    assert engine.stats.bytes_copied == sum(a.numel() * a.element_size() for a in state.arrays.values())
    for version in (0, 1):
        expected = SyntheticState.after_steps(version)
        for name, values in _stored(tmp_path, version, state).items():
            assert torch.equal(values, expected.arrays[name]), (version, name)
