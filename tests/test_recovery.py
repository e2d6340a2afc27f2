"""A snapshot outlives the trainer: after SIGKILL, training resumes from shared memory (L0) when it
is newer than anything on disk, and replays the uninterrupted run's losses bit for bit."""

import pytest

from checkpointing.storage import host_pool
from tests.launch import TINY, read_scalars, run_pretrain

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--lr", "3e-3", "--log-interval", "5", "--train-iters", "20", "--use-distributed-optimizer",
               "--async-save", "--save-interval", "1", "--ckpt-persistent-interval", "10"]
# Held (checkpointing/base/faults.py): each request waits until the previous version is in L0 and every
# earlier flush is done, so what a kill after iteration N leaves behind does not depend on the
# machine's speed: L0 holds N-1 (and N if its copy landed), L2 every due version before N.
HOLD = {"GPT_CKPT_HOLD": "request"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    run_pretrain(ARGS[: ARGS.index("--async-save")] + ["--tensorboard-dir", str(base / "tb")], nproc=2)
    return read_scalars(base / "tb", "lm loss")


@pytest.fixture
def ckpt(tmp_path):
    directory = tmp_path / "ckpt"
    yield directory
    host_pool.remove_segments(str(directory))


def test_sigkill_of_every_rank_resumes_from_shared_memory(reference, ckpt, tmp_path):
    common = ARGS + ["--save", str(ckpt), "--load", str(ckpt)]
    killed = run_pretrain(common, nproc=2, check=False, env={"GPT_CKPT_FAULT": "iteration:kill:14", **HOLD})
    assert killed.returncode != 0
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000010"]
    proc = run_pretrain(common + ["--tensorboard-dir", str(tmp_path / "tb")], nproc=2)
    assert "from L0 (shared memory" in proc.stdout, proc.stdout[-2000:]
    resumed = read_scalars(tmp_path / "tb", "lm loss")
    first = min(resumed)
    assert first in (14, 15), f"resumed at {first}: the newest whole snapshot is 13 or 14"
    for it in resumed:
        assert resumed[it] == reference[it], it


def test_torchrun_restarts_after_one_rank_is_killed(reference, ckpt, tmp_path):
    proc = run_pretrain(ARGS + ["--save", str(ckpt), "--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb")],
                        nproc=2, torchrun_args=("--max-restarts", "1"),
                        env={"GPT_CKPT_FAULT": "iteration:kill:12:1", "GPT_CKPT_FAULT_ONCE": str(tmp_path / "fired"),
                             # torch 2.13 shares the rendezvous store with the workers; a restarted
                             # attempt then reads stale gloo addresses (pytorch/pytorch#135712)
                             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **HOLD})
    assert "from L0 (shared memory" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = read_scalars(tmp_path / "tb", "lm loss")
    for it in resumed:
        assert resumed[it] == reference[it], it
    assert max(resumed) == 20


@pytest.mark.parametrize("fault, extra, first", [("step:kill:14", [], (13, 14)), ("L2.write:kill:10", [], (11, 12)),
                                                  ("step:kill:14", ["--save-interval", "3"], (13,))],
                         ids=["inside-a-step", "inside-a-flush", "inside-an-in-place-step"])
def test_sigkill_inside_a_zero_copy_step_or_a_flush_resumes_from_shared_memory(reference, ckpt, tmp_path, fault,
                                                                               extra, first):
    """Zero-copy snapshots (each step writes the next version into a pool slot): killed while a
    step writes a slot, or while the flush of version 10 writes it to L2, every rank resumes from
    a whole version in shared memory and replays the uninterrupted run bit for bit. With
    --save-interval 3, step 13 writes out of place (12 was requested) and step 14 updates that
    slot in place: killed there, the resume starts from version 12, untouched."""
    common = ARGS + ["--save", str(ckpt), "--load", str(ckpt), "--ckpt-snapshot", "zero-copy"] + extra
    killed = run_pretrain(common, nproc=2, check=False, env={"GPT_CKPT_FAULT": fault, **HOLD})
    assert killed.returncode != 0
    proc = run_pretrain(common + ["--tensorboard-dir", str(tmp_path / "tb")], nproc=2)
    assert "from L0 (shared memory" in proc.stdout, proc.stdout[-2000:]
    resumed = read_scalars(tmp_path / "tb", "lm loss")
    assert min(resumed) in first, sorted(resumed)
    for it in resumed:
        assert resumed[it] == reference[it], it
