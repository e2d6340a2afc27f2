"""The engine inside training (DP2, distributed optimizer, 2 processes): every version it writes
equals, bit for bit, what the synchronous path saves at that iteration, and the losses equal those
of training without checkpoints."""

import re

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.launch import TINY, read_scalars, run_pretrain

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--lr", "3e-3", "--log-interval", "4", "--train-iters", "8", "--use-distributed-optimizer",
               "--optimizer-shard-size-mb", "0.1"]


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoint objects (tensors, arrays, dicts, sequences)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("async")
    run_pretrain(ARGS + ["--tensorboard-dir", str(base / "tb-none")], nproc=2)
    run_pretrain(ARGS + ["--save", str(base / "sync"), "--save-interval", "1", "--tensorboard-dir", str(base / "tb-sync")], nproc=2)
    # Held (checkpointing/faults.py), so that the outcome does not depend on the machine's speed:
    # each version's copy starts only once the next optimizer step is blocked in a fence (the
    # optimizer really waits at fences), and each request waits until the previous version is
    # flushed (no version is superseded: every one reaches both levels).
    proc = run_pretrain(ARGS + ["--save", str(base / "async"), "--save-interval", "1", "--async-save",
                                "--ckpt-local-dir", str(base / "local"), "--ckpt-local-interval", "1",
                                "--ckpt-local-retain-last", "100",
                                "--tensorboard-dir", str(base / "tb-async")],
                        nproc=2, env={"GPT_CKPT_HOLD": "request,copy"})
    return base, proc.stdout


def test_losses_equal_training_without_checkpoints(runs):
    base, _ = runs
    assert read_scalars(base / "tb-async", "lm loss") == read_scalars(base / "tb-none", "lm loss")
    assert read_scalars(base / "tb-sync", "lm loss") == read_scalars(base / "tb-none", "lm loss")


def test_every_async_version_equals_the_synchronous_save(runs, tmp_path):
    base, stdout = runs
    waits = re.search(r"(\d+) fence waits", stdout)
    assert waits and int(waits.group(1)) >= 2 * 7, "each rank's steps 2-8 wait at a fence: " + stdout[-1500:]
    assert "  L1: 8 checkpoints" in stdout and "  L2: 8 checkpoints" in stdout, stdout[-1500:]  # the engine's record
    sync = {}
    for it in range(1, 9):
        dcp_to_torch_save(base / "sync" / f"iter_{it:07d}", tmp_path / "s.pt")
        sync[it] = torch.load(tmp_path / "s.pt", weights_only=False)
        sync[it]["common"].pop("args")  # the arguments differ (--async-save): everything else is equal
    for level in ("local", "async"):
        for it in range(1, 9):
            dcp_to_torch_save(base / level / f"iter_{it:07d}", tmp_path / "a.pt")
            a, s = torch.load(tmp_path / "a.pt", weights_only=False), sync[it]
            a["common"].pop("args")
            assert set(a) == set(s)
            for key in a:
                assert same(a[key], s[key]), (level, it, key)
