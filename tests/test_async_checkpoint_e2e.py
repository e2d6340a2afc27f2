"""The engine inside training (DP2, distributed optimizer, 2 processes): every version it writes
equals, bit for bit, what the synchronous path saves at that iteration, and the losses equal those
of training without checkpoints; with zero-copy snapshots (the default on a CPU: each step writes
into a pool slot) and with copied ones, fences hit in both."""

import re

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.launch import TINY, read_scalars, run_pretrain

pytestmark = pytest.mark.slow

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
    async_args = ARGS + ["--save-interval", "1", "--async-save", "--ckpt-local-interval", "1",
                         "--ckpt-local-retain-last", "100"]
    stdout = {}
    # Held (checkpointing/base/faults.py), so that the outcome does not depend on the machine's speed.
    # copy: the version is copied at its request (on the host: no fence waits), and each request
    # waits until the previous version is flushed (no version is superseded: every one reaches
    # both levels).
    # zero-copy, two slots: each flush starts only once a step is blocked in a fence on its slot
    # (the step two later: it waits shard by shard), and no flush is superseded.
    for mode, extra, hold in (("copy", [], "request"), ("zero-copy", ["--ckpt-host-versions", "1"], "flush")):
        proc = run_pretrain(async_args + extra + ["--ckpt-snapshot", mode, "--save", str(base / f"{mode}-l2"),
                                                  "--ckpt-local-dir", str(base / f"{mode}-l1"),
                                                  "--tensorboard-dir", str(base / f"tb-{mode}"),
                                                  "--metrics-file", str(base / f"metrics-{mode}.jsonl")],
                            nproc=2, env={"GPT_CKPT_HOLD": hold})
        stdout[mode] = proc.stdout
    return base, stdout


def test_the_start_up_report_names_its_parts(runs):
    """After the first iteration: the console's line and the metrics file's ``startup`` object,
    with the flusher forked from the template (no interpreter of its own) beside them."""
    from trainer import startup
    from trainer.metrics_file import read_metrics_file

    base, stdout = runs
    for mode in ("copy", "zero-copy"):
        record = read_metrics_file(str(base / f"metrics-{mode}.jsonl")).startup
        assert list(record["parts"]) == [startup.INTERPRETER, startup.PROCESS_GROUPS, startup.MODEL, startup.ENGINE,
                                         startup.LOAD, startup.FIRST_ITERATION]
        assert record["seconds"] == pytest.approx(sum(record["parts"].values()), abs=0.01)
        assert record["flusher"]["started"] == "forked from the template"
        assert 0 < record["flusher"]["unshared_mib"] < 64, record["flusher"]
        line = re.search(r"> start-up [\d.]+ s to the end of the first iteration: interpreter and imports [\d.]+ s, "
                         r"process groups .*checkpoint flusher \(forked from the template\) ready", stdout[mode])
        assert line, stdout[mode][:3000]


def test_losses_equal_training_without_checkpoints(runs):
    base, _ = runs
    for mode in ("copy", "zero-copy"):
        assert read_scalars(base / f"tb-{mode}", "lm loss") == read_scalars(base / "tb-none", "lm loss"), mode
    assert read_scalars(base / "tb-sync", "lm loss") == read_scalars(base / "tb-none", "lm loss")


@pytest.mark.parametrize("mode, min_waits", [("copy", 0), ("zero-copy", 2 * 6)])
def test_every_async_version_equals_the_synchronous_save(runs, tmp_path, mode, min_waits):
    """copy: copied at each request, no fence waits on the host; zero-copy: steps 3-8 wait for the
    flush of the slot they write (the version two back) to have read each shard."""
    base, stdout = runs
    out = stdout[mode]
    assert ("zero-copy: steps write into the pool" in out) == (mode == "zero-copy")
    waits = re.search(r"(\d+) fence waits", out)
    assert waits and int(waits.group(1)) >= min_waits, out[-1500:]
    assert mode == "zero-copy" or int(waits.group(1)) == 0, "a copied snapshot on the host never makes a fence wait"
    assert "  L1: 8 checkpoints" in out and "  L2: 8 checkpoints" in out, out[-1500:]  # the engine's record
    sync = {}
    for it in range(1, 9):
        dcp_to_torch_save(base / "sync" / f"iter_{it:07d}", tmp_path / "s.pt")
        sync[it] = torch.load(tmp_path / "s.pt", weights_only=False)
        sync[it]["common"].pop("args")  # the arguments differ (--async-save): everything else is equal
    for level in ("l1", "l2"):
        for it in range(1, 9):
            dcp_to_torch_save(base / f"{mode}-{level}" / f"iter_{it:07d}", tmp_path / "a.pt")
            a, s = torch.load(tmp_path / "a.pt", weights_only=False), sync[it]
            a["common"].pop("args")
            assert set(a) == set(s)
            for key in a:
                assert same(a[key], s[key]), (level, it, key)
