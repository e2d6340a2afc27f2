"""``GPT_CKPT_HOLD`` (``checkpointing.base.faults``): the holds that make the outcome of a trainer test
independent of the machine's speed. ``request`` makes every due version reach its level (nothing
is superseded) and fixes what L0 and the levels hold when training passes an iteration: checked
against the engine's own record, with a disk slower than the steps (which, without the hold,
supersedes versions). The holds live in ``checkpointing.engine.pacing``, not in the engine's rules."""

import pytest
import torch

from checkpointing.base import faults
from checkpointing.engine import pacing
from checkpointing.engine.control_block import ControlBlock
from checkpointing.format.reader import CheckpointReader
from tests.helpers import SyntheticState, make_engine

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pools_removed")]


def test_hold_spec_names_points_and_iterations(monkeypatch):
    monkeypatch.delenv(faults.HOLD_ENV, raising=False)
    assert not faults.holds("request") and not faults.holds("copy", 3)
    monkeypatch.setenv(faults.HOLD_ENV, "request, copy:3")
    assert faults.holds("request") and faults.holds("request", 7)
    assert faults.holds("copy") and faults.holds("copy", 3) and not faults.holds("copy", 4)
    assert not faults.holds("flush")


def test_request_hold_flushes_every_version_before_the_next_request(tmp_path, single_process_group, monkeypatch):
    monkeypatch.setenv(faults.HOLD_ENV, "request")
    monkeypatch.setenv(faults.DELAY_ENV, "flush:50")  # a disk slower than the steps
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=1)
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


def test_request_hold_lands_the_requested_version_before_the_next_zero_copy_step(tmp_path, single_process_group,
                                                                                 monkeypatch):
    """--save-interval 3, zero-copy, a slow L0 commit: the held step after a request starts only
    once the requested version is described in L0, so a kill inside any later step finds it there
    (tests/test_recovery.py's in-place step). Without the hold the step does not wait for it."""
    monkeypatch.setenv(faults.DELAY_ENV, "describe:1000")
    for held in (True, False):
        if held:
            monkeypatch.setenv(faults.HOLD_ENV, "request")
        else:
            monkeypatch.delenv(faults.HOLD_ENV)
        state = SyntheticState(shards=2)
        engine, _ = make_engine(tmp_path / str(held), single_process_group, state, slots=3, interval=3, zero_copy=True)
        for version in range(1, 4):
            state.optimizer_step(engine)
        engine.request(3)
        begin_step, seen = engine.begin_step, []

        def step_four():
            arrays = begin_step()
            seen.append(any(s.version == 3 and s.described_at() > 0 for s in engine.pool.slots))
            return arrays

        engine.begin_step = step_four
        state.optimizer_step(engine)
        engine.close()
        assert seen == [held], f"held {held}: version 3 in L0 when step 4 began: {seen}"


def test_without_a_hold_the_pacing_does_nothing(monkeypatch, tmp_path):
    """Production pacing: requests never wait for background work, flushes never wait and are
    superseded as the rules say; only the environment of a test arms a hold."""
    for name in (faults.HOLD_ENV, faults.DISK_GATE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert type(pacing.training_pacing()) is pacing.TrainingPacing
    block = ControlBlock(str(tmp_path / "ctl"), create=True)
    production = pacing.flusher_pacing(block, 0)
    assert type(production) is pacing.FlusherPacing and production.may_supersede
    monkeypatch.setenv(faults.HOLD_ENV, "flush")
    held = pacing.flusher_pacing(block, 0)
    assert not held.may_supersede
    monkeypatch.setenv(faults.HOLD_ENV, "read:2")
    assert pacing.flusher_pacing(block, 0).read_pause == 2 and faults.hold_value("read") == 2
    block.close()
