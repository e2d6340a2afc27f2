"""The flusher process: the training process keeps no checkpoint thread; a flusher that dies,
hangs or fails stops training with a message naming it (the L0 pool kept); the flusher never
outlives its trainer, whichever way the trainer ends."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from checkpointing.base.errors import FlusherError
from checkpointing.storage.host_pool import pool_files
from tests.helpers import SyntheticState, make_engine, process_gone

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pools_removed")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _threads() -> dict[int, str]:
    tasks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            tasks[int(tid)] = f.read().strip()
    return tasks


@pytest.mark.parametrize("zero_copy", [False, True])
def test_no_checkpoint_thread_in_the_training_process(tmp_path, single_process_group, zero_copy):
    state = SyntheticState()
    state.optimizer_step()  # torch starts its own worker threads on first use: not ours
    torch.cat([state.arrays["a"], state.arrays["b"]]).sum()
    before = _threads()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=zero_copy)
    for version in range(1, 6):
        state.optimizer_step(engine)
        engine.request(version)
        during = _threads()
        assert during == before, f"threads appeared beside training: {set(during.items()) - set(before.items())}"
    engine.close()
    assert [f.version for f in engine.stats.flushes][-1] == 5
    assert engine.stats.flusher_cpu_seconds > 0, "the flusher's CPU is reported from its process clock"
    assert process_gone(engine.flusher_pid), "a closed engine's flusher exits"


def test_a_killed_idle_flusher_stops_training_at_the_next_request(tmp_path, single_process_group):
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=True)
    state.optimizer_step(engine)
    engine.request(1)
    engine.wait_idle()
    os.kill(engine.flusher_pid, signal.SIGKILL)
    engine.flusher.wait_exit(timeout=20)  # its exit is complete (the engine's own handle keeps the status)
    with pytest.raises(FlusherError) as raised:
        state.optimizer_step(engine)  # the step (zero-copy: its slot) or the request notices
    message = str(raised.value)
    assert "killed by SIGKILL" in message and f"pid {engine.flusher_pid}" in message, message
    assert "L2 iteration 1" in message and "kept for the restart" in message, message
    engine.close(drain=False)  # the error path: must neither hang nor raise
    assert all(os.path.exists(slot.path) for slot in engine.pool.slots), "the L0 pool is kept"
    assert any(slot.version == 1 and slot.small_state for slot in engine.pool.slots)


@pytest.mark.parametrize("point", ["L2.write", "L2.metadata"])
def test_a_flusher_killed_in_a_flush_leaves_it_uncommitted_and_training_stops(tmp_path, single_process_group,
                                                                              monkeypatch, point):
    monkeypatch.setenv("GPT_CKPT_FAULT", f"{point}:kill:2")  # the flusher's environment: it dies, not the trainer
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=True)
    state.optimizer_step(engine)
    engine.request(1)
    engine.wait_idle()
    state.optimizer_step(engine)
    engine.request(2)
    with pytest.raises(FlusherError, match="killed by SIGKILL"):
        engine.wait_idle()  # or the next request or fence: whichever comes first notices
    assert (tmp_path / "l2" / "iter_0000001" / ".metadata").exists()
    assert not (tmp_path / "l2" / "iter_0000002" / ".metadata").exists(), "a killed flush is never committed"
    assert (tmp_path / "l2" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    engine.close(drain=False)
    assert sorted(s.version for s in engine.pool.slots if s.small_state) == [1, 2], "both versions stay in L0"


@pytest.mark.parametrize("action", ["kill", "fail"])
def test_a_flusher_that_dies_while_starting_is_named(tmp_path, single_process_group, monkeypatch, action):
    """Before its error handler runs, so it sends nothing: the engine names it and its exit at the
    first request (it starts beside the trainer's work); the empty pool is removed."""
    monkeypatch.setenv("GPT_CKPT_FAULT", f"flusher.start:{action}")
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=True)
    state.optimizer_step(engine)
    with pytest.raises(FlusherError, match=r"rank 0: the checkpoint flusher \(pid \d+\) "
                                           + ("was killed by SIGKILL" if action == "kill" else "exited with status")):
        engine.request(1)
    engine.close(drain=False)
    assert process_gone(engine.flusher_pid)
    assert not any(os.path.exists(path) for path in pool_files(engine.pool).files), "an empty pool is not left behind"


def test_a_hung_flusher_stops_training_within_its_timeout(tmp_path, single_process_group):
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=True)
    state.optimizer_step(engine)
    engine.request(1)
    engine.wait_idle()  # under the default timeout: a busy machine may hold the first flush for seconds
    engine.flusher.timeout = 5.0  # from here on, as --ckpt-flusher-timeout 5 does
    os.kill(engine.flusher_pid, signal.SIGSTOP)  # alive, but it never answers again
    try:
        started = time.monotonic()
        with pytest.raises(FlusherError, match="has not answered|without progress"):
            for version in range(2, 600):  # a request or a fence notices (within 30 s of steps, or the test fails)
                state.optimizer_step(engine)
                engine.request(version)
                time.sleep(0.05)
        assert time.monotonic() - started < 30
    finally:
        os.kill(engine.flusher_pid, signal.SIGCONT)
    engine.close(drain=False)
    assert process_gone(engine.flusher_pid), "the hung flusher is killed"


def test_a_flushers_own_failure_is_reported_whole(tmp_path, single_process_group, monkeypatch):
    monkeypatch.setenv("GPT_CKPT_FAULT", "describe:bogus:1")  # an error the flusher does not expect
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=True)
    state.optimizer_step(engine)
    engine.request(1)
    with pytest.raises(FlusherError) as raised:
        engine.wait_idle()
    assert "action must be kill, fail or readonly" in str(raised.value), "the flusher's traceback reaches the user"
    engine.close(drain=False)
    assert process_gone(engine.flusher_pid)


TRAINER = textwrap.dedent("""
    import os, sys, time
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.path.insert(0, {root!r})
    if {template!r}:
        from checkpointing.engine.flusher_template import start_template
        assert start_template() is not None
    import torch.distributed as dist
    from tests.helpers import SyntheticState, make_engine, free_port
    import pathlib
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    state = SyntheticState(shard_numel=1 << 18)
    engine, _ = make_engine(pathlib.Path({tmp!r}), dist.group.WORLD, state, tag={tag!r}, zero_copy=True)
    state.optimizer_step(engine)
    engine.request(1)
    print(engine.flusher_pid, flush=True)
    {ending}
""")


@pytest.mark.slow  # a trainer process of its own per case
@pytest.mark.parametrize("ending,template", [("time.sleep(600)", True), ("raise RuntimeError('training failed')", True),
                                             ("sys.exit(0)", True), ("time.sleep(600)", False)])
def test_the_flusher_never_outlives_its_trainer(tmp_path, ending, template):
    """SIGKILL of the trainer, an uncaught error, an exit without closing the engine: the
    flusher goes with it (parent-death signal, end of the socket), forked from the template or
    started with its own interpreter."""
    tag = f"test-outlive-{os.getpid()}-{time.monotonic_ns()}"
    code = TRAINER.format(root=ROOT, tmp=str(tmp_path), tag=tag, ending=ending, template=template)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["GPT_CKPT_DELAY"] = "flush:2000"  # the flusher is in a flush when its trainer goes
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env)
    try:
        pid = int(trainer.stdout.readline())
        if ending.startswith("time.sleep"):
            trainer.kill()
        trainer.wait(timeout=60)
        assert process_gone(pid), f"flusher {pid} outlived its trainer ({ending})"
    finally:
        trainer.kill()
        from checkpointing.storage import host_pool

        for path in host_pool.list_segments(tag):
            os.unlink(path)
