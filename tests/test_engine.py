"""The async engine on a synthetic state, in one process: consistency, per-shard fences, pool
budget and memory, backpressure under a slow disk, failed flushes."""

import os
import threading
import time

import psutil
import pytest
import torch

from checkpointing import direct_io, host_pool
from checkpointing.engine import CheckpointEngine
from checkpointing.levels import Level
from checkpointing.host_pool import ArraySpec, HostPool
from checkpointing.reader import CheckpointReader
from checkpointing.shard_copy import HostShardCopier
from tests.helpers import SHARDS, SyntheticState, make_engine, shared_memory_removed_after


class _ObservedEvent(threading.Event):
    """A shard's completion flag that also says when a fence has started waiting on it."""

    def __init__(self):
        super().__init__()
        self.waited_on = threading.Event()

    def wait(self, timeout=None):
        self.waited_on.set()
        return super().wait(timeout)


class HoldCopies:
    """A copy hook that holds the copy of each shard in ``shards`` until the training thread is
    blocked in that shard's fence: the fence then waits, every time, however loaded the machine
    (a sleep in the hook only makes a wait likely). ``after`` (shard -> threading.Event) holds a
    shard's copy also until that event is set. ``release()`` lets every held copy go."""

    def __init__(self, engine, shards, after=None):
        self.shards, self.after = set(shards), after or {}
        self.released = threading.Event()
        self.done = engine.copier._done
        for index in self.shards:
            self.done[index] = _ObservedEvent()
            self.done[index].set()
        self.started: list[int] = []

    def __call__(self, index: int) -> None:
        if index in self.after:
            assert self._wait(self.after[index]), f"shard {index}: what its copy waits for never happened"
        if index in self.shards:
            assert self._wait(self.done[index].waited_on), f"no fence waited for shard {index}"
            self.done[index].waited_on.clear()
        self.started.append(index)

    def _wait(self, event: threading.Event) -> bool:
        deadline = time.monotonic() + 60
        while not event.wait(0.05):
            if self.released.is_set():
                return True
            if time.monotonic() > deadline:
                return False
        return True

    def release(self) -> None:
        self.released.set()


@pytest.fixture(autouse=True)
def remove_pools():
    with shared_memory_removed_after():
        yield


def test_every_version_is_the_state_after_its_step_despite_slow_copies(tmp_path, single_process_group):
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state)
    # Every shard's copy starts only once the next step is blocked in that shard's fence: the
    # optimizer and the copy interleave shard by shard, the hardest case for consistency.
    hold = engine.copy_hook = HoldCopies(engine, range(SHARDS))
    expected = {}
    for it in range(1, 7):
        state.optimizer_step(engine)
        expected[it] = {k: v.clone() for k, v in state.arrays.items()}
        engine.request(it, force_flush=True)  # forced: never superseded, so every version is checked
    hold.release()  # no step follows the last request
    engine.close(drain=True)
    assert engine.stats.fence_waits == 5 * SHARDS, "every fence of steps 2-6 must have waited for its copy"
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


def test_fence_waits_only_for_the_shard_whose_copy_is_late(tmp_path, single_process_group):
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, interval=10**6)
    delayed = 2
    # The late shard's copy starts only after the step has updated the shard before it, and is
    # blocked in the late shard's fence: a fence over all shards would never get there (the hook
    # then fails after 60 s instead of the test hanging).
    updated_before_late = threading.Event()
    hold = engine.copy_hook = HoldCopies(engine, [delayed], after={delayed: updated_before_late})
    state.optimizer_step(engine)
    before = {k: v.clone() for k, v in state.arrays.items()}
    engine.request(1)
    for index in range(delayed):  # the copies before the late one are done before the step
        assert engine.copier._done[index].wait(60)
    updated = []

    def on_shard(index):
        updated.append((index, list(hold.started)))
        if index == delayed - 1:
            updated_before_late.set()

    state.optimizer_step(engine, on_shard=on_shard)
    stall = engine.stats.stall_by_shard
    assert stall[:delayed] == [0.0] * delayed and stall[delayed] > 0, stall
    # The shards after the late one are copied after it: their fences may wait too (on a loaded
    # machine the step can reach shard 3 before the copy thread does), those before it never.
    assert 1 <= engine.stats.fence_waits <= SHARDS - delayed
    assert [(i, delayed in started) for i, started in updated] == [(0, False), (1, False), (2, True), (3, True)], \
        "shards before the late one are updated while its copy has not started; the late one after it"
    hold.release()
    engine.close(drain=True)
    slot = next(s for s in engine.pool.slots if s.version == 1)
    for k in before:
        assert torch.equal(slot.arrays[k], before[k]), "the snapshot is the state before the next step"


def test_request_leaves_the_old_description_to_the_copy_thread(tmp_path, single_process_group, monkeypatch):
    """The training thread does no file-system work in ``request``; the reused slot's old
    description stays valid until the copy thread removes it, before the first byte is copied."""
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=10**6)  # L0 only
    for it in (1, 2):
        state.optimizer_step(engine)
        engine.request(it)
        engine.wait_idle()
    reused = next(s for s in engine.pool.slots if s.version == 1)
    assert os.path.exists(reused.meta_path)
    unlinked_by, real_unlink = [], os.unlink
    monkeypatch.setattr(os, "unlink", lambda path: (unlinked_by.append(threading.current_thread().name), real_unlink(path)))
    started, go_on = threading.Event(), threading.Event()
    meta_at_first_copy = []

    def hold_first_shard(index):
        if index == 0:
            meta_at_first_copy.append(os.path.exists(reused.meta_path))
            started.set()
            go_on.wait(10)

    engine.copy_hook = hold_first_shard
    state.optimizer_step(engine)
    engine.request(3)
    assert reused.version == 3 and unlinked_by == [], "request must not touch the file system"
    assert started.wait(10)
    go_on.set()
    engine.close(drain=True)
    assert meta_at_first_copy == [False], "the old description must be gone before the slot is overwritten"
    assert unlinked_by == ["ckpt-copy"]
    assert host_pool.read_description(reused.meta_path)["version"] == 3


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
    assert len(host_pool.list_segments(engine.pool.tag)) == 4  # 2 slots and their descriptions, reused
    assert rss[200] - rss[20] < 16 * 2**20, f"memory grew by {(rss[200] - rss[20]) / 2**20:.1f} MiB"


def test_slow_disk_skips_superseded_versions_instead_of_stalling(tmp_path, single_process_group):
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=3, interval=1)
    # The disk is stuck until every version is requested: with 3 slots, training could not go
    # past the 3rd request unless superseded versions gave their slots up (the loop would hang).
    disk = threading.Event()
    engine.flush_hook = lambda level, version: disk.wait(60)
    expected = {}
    for it in range(1, 9):
        state.optimizer_step(engine)
        expected[it] = {k: v.clone() for k, v in state.arrays.items()}
        engine.request(it)
    disk.set()
    engine.close(drain=True)
    flushed = [f.version for f in engine.stats.flushes if f.error is None]
    # The flush thread holds at most one version at the stuck disk: the first it claimed (which
    # one depends on when its copy landed); it is written once the disk frees up. Every other
    # version before 8 was superseded.
    assert flushed[-1] == 8 and len(flushed) <= 2, flushed
    assert engine.stats.skipped["L2"] == 8 - len(flushed), (flushed, engine.stats.skipped)
    for it in flushed:  # a slot taken from a superseded version never leaks into a flushed one
        loaded = {k: torch.empty_like(v) for k, v in expected[it].items()}
        CheckpointReader(str(tmp_path / "l2" / f"iter_{it:07d}")).read_pieces(state.save_pieces, loaded)
        assert all(torch.equal(loaded[k], expected[it][k]) for k in loaded), f"version {it}"


def test_slow_disk_stalls_only_once_the_pool_is_full(tmp_path, single_process_group):
    """Forced flushes (every version must reach the disk) are never superseded: a slow disk
    fills the pool, and then the request waits, counted as stall."""
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=3, interval=1)
    disk = threading.Event()
    engine.flush_hook = lambda level, version: disk.wait(60)

    def free_the_disk_once_a_request_waits():
        while engine.stats.backpressure_waits == 0:
            time.sleep(0.01)
        disk.set()

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
    state = SyntheticState()
    engine, logs = make_engine(tmp_path, single_process_group, state, interval=1)
    monkeypatch.setenv("GPT_CKPT_FAULT", "L2.write:fail")
    state.optimizer_step(engine)
    engine.request(1)
    while not engine.stats.flushes:
        time.sleep(0.01)
    monkeypatch.delenv("GPT_CKPT_FAULT")
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
    for listing in ([], ["--list"]):  # listing is the default; the README spells it out
        assert host_pool.main([*listing, "--save", str(tmp_path)]) == 0
        assert capsys.readouterr().out.count(f"gptckpt-{tag}-r0-s") == 2
    host_pool.main(["--save", str(tmp_path), "--remove"])
    assert host_pool.list_segments(tag) == []
