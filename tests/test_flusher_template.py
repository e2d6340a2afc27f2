"""Flushers forked from the pre-imported template (``checkpointing.engine.flusher_template``): they do
what a flusher with its own interpreter does (bit-for-bit versions through the zero-copy fences,
commits), are the trainer's children, and cost a few MiB; killing the template, a flusher or the
trainer at start-up leaves no process and no pool file behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from checkpointing.engine import flusher_template
from checkpointing.format.reader import CheckpointReader
from tests.helpers import SyntheticState, make_engine, process_gone

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("pools_removed")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_forked_flusher_writes_every_version_bit_for_bit_through_the_fences(tmp_path, single_process_group):
    assert flusher_template.current_template() is not None, "tests/conftest.py forks the template"
    state = SyntheticState()
    engine, _ = make_engine(tmp_path, single_process_group, state, zero_copy=True)
    assert engine.flusher.how_started == "forked from the template"
    assert _parent(engine.flusher_pid) == os.getpid(), "re-parented to the trainer, which waits on it"
    expected = {}
    for it in range(1, 6):
        state.optimizer_step(engine)  # zero-copy: the step writes the slot, shard by shard, behind the fences
        expected[it] = {k: v.clone() for k, v in state.arrays.items()}
        engine.request(it, force_flush=True)
    engine.close(drain=True)
    assert [f.version for f in engine.stats.flushes if f.error is None] == [1, 2, 3, 4, 5]
    for it, arrays in expected.items():
        reader = CheckpointReader(str(tmp_path / "l2" / f"iter_{it:07d}"))
        loaded = {k: torch.empty_like(v) for k, v in arrays.items()}
        reader.read_pieces(state.save_pieces, loaded)
        assert all(torch.equal(loaded[k], arrays[k]) for k in arrays), f"version {it}"
    assert (tmp_path / "l2" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    # Its own pages only: a fresh interpreter holds ~145 MiB of its own
    assert 0 < engine.stats.flusher_rss_bytes < 64 * 2**20, engine.stats.flusher_rss_bytes
    assert process_gone(engine.flusher_pid)


TRAINER = textwrap.dedent("""
    import os, signal, sys, pathlib
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.path.insert(0, {root!r})
    from checkpointing.engine import flusher_template
    if {spawned!r}:  # a process already running a thread: the template is an interpreter of its own
        import threading
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        assert flusher_template.start_template() is None  # no fork of a threaded process
    template = flusher_template.start_template(spawn={spawned!r})
    print(template.pid, flush=True)
    import torch.distributed as dist
    from tests.helpers import SyntheticState, make_engine, free_port
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    if {case!r} == "template":
        os.kill(template.pid, signal.SIGKILL)
    state = SyntheticState(shard_numel=1 << 12)
    try:
        engine, _ = make_engine(pathlib.Path({tmp!r}), dist.group.WORLD, state, tag={tag!r}, zero_copy=True)
    except Exception as error:
        print("ERROR", error, flush=True)
        sys.exit(0)
    print(engine.flusher_pid, flush=True)
    if {case!r} == "trainer":
        os.kill(os.getpid(), signal.SIGKILL)  # the flusher is still starting (held at flusher.start)
    state.optimizer_step(engine)
    if {case!r} == "trainer after a version":
        engine.request(1)
        engine.wait_idle()
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        engine.request(1)
    except Exception as error:
        print("ERROR", error, flush=True)
    engine.close(drain=False)
""")


@pytest.mark.parametrize("case, spawned", [("template", False), ("flusher", False), ("trainer", False),
                                           ("trainer after a version", False), ("template", True), ("trainer", True),
                                           ("trainer after a version", True)])
def test_a_kill_at_start_up_leaves_no_process_and_no_pool(tmp_path, case, spawned):
    """The template, a flusher or the trainer killed while the flusher starts: every process goes,
    with the pool no version reached. A pool that holds a version is kept (for recovery). The same
    for a template started as its own interpreter (``spawned``: the trainer ran a thread)."""
    from checkpointing.storage import host_pool

    tag = f"test-template-{case}-{os.getpid()}-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if case == "flusher":
        env["GPT_CKPT_FAULT"] = "flusher.start:kill"
    if case == "trainer":
        env["GPT_CKPT_DELAY"] = "flusher.start:3000"
    code = TRAINER.format(root=ROOT, tmp=str(tmp_path), tag=tag, case=case, spawned=spawned)
    trainer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = trainer.stdout.splitlines()
    try:
        template = int(lines[0])
        if case == "template":
            assert lines[1].startswith(f"ERROR the flusher template (pid {template}) was killed by SIGKILL"), lines
        elif case == "flusher":
            assert "the checkpoint flusher" in lines[2] and "was killed by SIGKILL" in lines[2], lines
        else:
            assert trainer.returncode == -signal.SIGKILL, (trainer.returncode, trainer.stderr[-2000:])
        if case == "trainer after a version":
            for pid in (template, int(lines[1])):
                assert process_gone(pid)
            assert any(p.endswith(".meta") for p in host_pool.list_segments(tag)), "the pool with version 1 is kept"
            return
        for pid in [template] + ([int(lines[1])] if case != "template" else []):
            assert process_gone(pid), f"process {pid} outlived its trainer ({case} killed)"
        deadline = time.monotonic() + 10
        while host_pool.list_segments(tag) and time.monotonic() < deadline:  # the template removes it as it goes
            time.sleep(0.05)
        assert host_pool.list_segments(tag) == [], f"{case} killed at start-up: the empty pool is left behind"
    finally:
        for path in host_pool.list_segments(tag):
            os.unlink(path)
