"""The async engine on a synthetic state, in one process: consistency, per-shard fences, pool
budget and memory, backpressure under a slow disk, failed flushes."""

import os
import threading
import time

import psutil
import pytest
import torch

from checkpointing.base import direct_io
from checkpointing.base.levels import Level
from checkpointing.engine.checkpoint_engine import CheckpointEngine
from checkpointing.engine.shard_copy import HostShardCopier
from checkpointing.format.reader import CheckpointReader
from checkpointing.storage import host_pool
from checkpointing.storage.host_pool import ArraySpec, HostPool
from tests.helpers import SyntheticState, make_engine

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pools_removed")]


def test_copied_snapshots_are_the_state_after_their_step_and_fences_never_wait(tmp_path, single_process_group):
    """On the host a copied snapshot is taken at ``request``, on the training thread (no copy
    thread): every version is the state after its step, bit for bit, and no fence waits."""
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state)
    expected = {}
    for it in range(1, 7):
        state.optimizer_step(engine)
        expected[it] = {k: v.clone() for k, v in state.arrays.items()}
        engine.request(it, force_flush=True)  # forced: never superseded, so every version is checked
    engine.close(drain=True)
    assert engine.stats.fence_waits == 0 and engine.stats.bytes_copied == 6 * sum(
        a.numel() * a.element_size() for a in state.arrays.values())
    flushed = [f.version for f in engine.stats.flushes if f.error is None]
    assert flushed == [1, 2, 3, 4, 5, 6]
    for it in flushed:
        arrays = expected[it]
        reader = CheckpointReader(str(tmp_path / "l2" / f"iter_{it:07d}"))
        loaded = {k: torch.empty_like(v) for k, v in arrays.items()}
        reader.read_pieces(state.save_pieces, loaded)
        for k in arrays:
            assert torch.equal(loaded[k], arrays[k]), f"version {it}, array {k}"
        assert reader.read_object("common") == {"iteration": it}


def test_a_reused_slot_loses_its_old_description_before_its_first_byte_changes(tmp_path, single_process_group):
    """The old description of a reused slot is removed before the copy starts (a crash mid-copy
    must not recover it); the flusher process writes the new one (the L0 commit)."""
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=10**6)  # L0 only
    for it in (1, 2):
        state.optimizer_step(engine)
        engine.request(it)
        engine.wait_idle()
    reused = next(s for s in engine.pool.slots if s.version == 1)
    assert host_pool.read_description(reused.meta_path)["version"] == 1
    meta_at_copy, start = [], engine.snapshots.start
    engine.snapshots.start = lambda live, slot, version: (meta_at_copy.append(os.path.exists(reused.meta_path)),
                                                          start(live, slot, version))[1]
    state.optimizer_step(engine)
    engine.request(3)
    engine.close(drain=True)
    assert meta_at_copy == [False], "the old description must be gone before the slot is overwritten"
    assert host_pool.read_description(reused.meta_path)["version"] == 3
    assert reused.version == 3 and reused.small_state == {"common": {"iteration": 3}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_host_copier_copies_every_byte_of_a_shard(dtype):
    copier = HostShardCopier(2)
    live = torch.randn(3000).to(dtype) if dtype != torch.uint8 else torch.randint(0, 256, (3000,), dtype=dtype)
    pool = torch.zeros(3000, dtype=dtype)
    strided = torch.zeros(6000, dtype=dtype)[::2]  # not contiguous: copy_ instead of memmove
    copier.begin()
    copier.copy(1, [(pool[1000:], live[1000:]), (strided[1000:], live[1000:])])
    assert copier.fence(1, 0) is None, "the shard is copied: its fence must not wait"
    assert torch.equal(pool[1000:].view(torch.uint8), live[1000:].view(torch.uint8))
    assert torch.equal(strided[1000:], live[1000:])
    assert not pool[:1000].any(), "bytes outside the shard must be left alone"


def test_pool_stays_in_budget_and_memory_does_not_grow_over_200_checkpoints(tmp_path, single_process_group):
    state = SyntheticState(shard_numel=1 << 19)  # 2 arrays x 8 MiB
    one_version = host_pool.slot_bytes({k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()})
    budget = int(2.5 * one_version)
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=4, interval=50, budget=budget)
    assert len(engine.pool.slots) == 2 and engine.pool.bytes <= budget
    process = psutil.Process()
    rss = {}
    for it in range(1, 201):
        state.optimizer_step(engine)
        engine.request(it)
        if it in (20, 200):
            rss[it] = process.memory_info().rss
    engine.close(drain=True)
    assert engine.stats.copies == 200
    assert len(host_pool.list_segments(engine.pool.tag)) == 5  # 2 slots, their descriptions, the control block
    assert rss[200] - rss[20] < 16 * 2**20, f"memory grew by {(rss[200] - rss[20]) / 2**20:.1f} MiB"


def test_slow_disk_skips_superseded_versions_instead_of_stalling(tmp_path, single_process_group, monkeypatch):
    gate = tmp_path / "disk-free"
    monkeypatch.setenv("GPT_CKPT_DISK_GATE", str(gate))  # the flusher's disk is stuck until the file exists
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=3, interval=1)
    # With 3 slots, training could not go past the 3rd request unless superseded versions gave
    # their slots up (the loop would hang).
    expected = {}
    for it in range(1, 9):
        state.optimizer_step(engine)
        expected[it] = {k: v.clone() for k, v in state.arrays.items()}
        engine.request(it)
    gate.touch()
    engine.close(drain=True)
    flushed = [f.version for f in engine.stats.flushes if f.error is None]
    # The flusher holds at most one version at the stuck disk: the first it claimed (which one
    # depends on when it took it); it is written once the disk frees up. Every other version
    # before 8 was superseded.
    assert flushed[-1] == 8 and len(flushed) <= 2, flushed
    assert engine.stats.skipped["L2"] == 8 - len(flushed), (flushed, engine.stats.skipped)
    assert engine.stats.backpressure_waits == 0
    for it in flushed:  # a slot taken from a superseded version never leaks into a flushed one
        loaded = {k: torch.empty_like(v) for k, v in expected[it].items()}
        CheckpointReader(str(tmp_path / "l2" / f"iter_{it:07d}")).read_pieces(state.save_pieces, loaded)
        assert all(torch.equal(loaded[k], expected[it][k]) for k in loaded), f"version {it}"


def test_slow_disk_stalls_only_once_the_pool_is_full(tmp_path, single_process_group, monkeypatch):
    """Forced flushes (every version must reach the disk) are never superseded: a slow disk
    fills the pool, and then the request waits, counted as stall."""
    gate = tmp_path / "disk-free"
    monkeypatch.setenv("GPT_CKPT_DISK_GATE", str(gate))
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=3, interval=1)

    def free_the_disk_once_a_request_waits():
        while engine.stats.backpressure_waits == 0:
            time.sleep(0.01)
        gate.touch()

    threading.Thread(target=free_the_disk_once_a_request_waits, daemon=True).start()
    waits_after = {}
    for it in range(1, 7):
        state.optimizer_step(engine)
        engine.request(it, force_flush=True)
        waits_after[it] = engine.stats.backpressure_waits
    assert [waits_after[it] for it in (1, 2, 3)] == [0, 0, 0], "the pool had free slots: no request may wait"
    assert waits_after[4] == 1, "the 4th version finds every slot pinned by an unwritten forced flush"
    assert engine.stats.stall_by_iteration[4] > 0
    engine.close(drain=True)
    assert [f.version for f in engine.stats.flushes] == [1, 2, 3, 4, 5, 6]
    # each record holds the flusher's CPU clock (since ready) when it ended: the bench's steady state
    cpu = [f.flusher_cpu_seconds for f in engine.stats.flushes]
    assert cpu == sorted(cpu) and 0 < cpu[-1] <= engine.stats.flusher_cpu_seconds


def test_write_rate_limit_paces_the_flush(tmp_path, single_process_group):
    state = SyntheticState(shard_numel=1 << 20)  # 2 arrays x 16 MiB
    specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
    pool = HostPool(f"test-{os.getpid()}-{time.monotonic_ns()}", 0, specs, 2, None)
    engine = CheckpointEngine(state, pool, [Level("L2", str(tmp_path / "l2"), 1, None, None, 32e6)],
                              single_process_group, print)
    state.optimizer_step(engine)
    engine.request(1)
    engine.close(drain=True)
    (flush,) = engine.stats.flushes
    assert flush.error is None and flush.bytes > 32e6
    # the first piece goes at once, every later one waits its turn
    assert flush.seconds >= 0.9 * (flush.bytes - direct_io.PACE_BYTES) / 32e6, f"{flush.bytes} bytes in {flush.seconds:.2f} s"


@pytest.mark.slow  # a 2-process job
def test_two_ranks_skip_the_same_superseded_versions(tmp_path):
    from tests.launch import ROOT, run_pretrain

    proc = run_pretrain([str(tmp_path)], nproc=2, timeout=120, script=ROOT / "tests" / "workers" / "engine_skip_worker.py")
    assert "OK flushed" in proc.stdout, proc.stdout + proc.stderr


def test_failed_flush_is_reported_training_goes_on_and_next_version_is_tried(tmp_path, single_process_group, monkeypatch):
    monkeypatch.setenv("GPT_CKPT_FAULT", "L2.write:fail:1")  # the flusher's disk is full for version 1
    state = SyntheticState()
    engine, logs = make_engine(tmp_path, single_process_group, state, interval=1)
    state.optimizer_step(engine)
    engine.request(1)
    engine.wait_idle()
    state.optimizer_step(engine)
    engine.request(2)
    engine.close(drain=True)
    first, second = engine.stats.flushes
    assert first.error and "No space left" in first.error and second.error is None
    warning = next(line for line in logs if line.startswith("WARNING"))
    assert "L2 flush of iteration 1" in warning and str(tmp_path / "l2") in warning and "rank 0" in warning
    assert not (tmp_path / "l2" / "iter_0000001" / ".metadata").exists()
    assert (tmp_path / "l2" / "iter_0000002" / ".metadata").exists()
    assert any(s.version == 1 for s in engine.pool.slots), "the failed version stays in L0"


def test_host_pool_command_lists_and_removes_a_jobs_segments(tmp_path, capsys):
    tag = host_pool.job_tag(str(tmp_path))
    HostPool(tag, 0, {"a": ArraySpec(1000, torch.float32)}, 2, None)
    for listing in ([], ["--list"]):  # listing is the default; docs/checkpointing.md spells it out
        assert host_pool.main([*listing, "--save", str(tmp_path)]) == 0
        assert capsys.readouterr().out.count(f"gptckpt-{tag}-r0-s") == 2
    host_pool.main(["--save", str(tmp_path), "--remove"])
    assert host_pool.list_segments(tag) == []
