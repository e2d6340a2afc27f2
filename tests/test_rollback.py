"""Rollback: a run resumed after ``rollback.sh STEP`` replays the original bit for bit, on mock and
on real (indexed) data; later checkpoints are kept aside on every level; ``--list`` tells states."""

import os
import random
import re
import subprocess
import sys

import pytest

from checkpointing.storage import host_pool
from tests.launch import ROOT, TINY, read_scalars, rollback, run_pretrain

pytestmark = pytest.mark.slow

COMMON = TINY[:TINY.index("--seq-length")] + ["--seq-length", "32", "--max-position-embeddings", "32",
                                               "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
                                               "--log-interval", "10", "--lr-decay-iters", "30"]


@pytest.fixture(params=["mock", "real"])
def data_args(request, tmp_path):
    if request.param == "mock":
        return ["--mock-data", "--vocab-size", "1024"]
    words = ["checkpoint", "tensor", "pipeline", "shard", "fence", "gradient", "rollback", "commit", "level"]
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(40)))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--input", str(text),
                    "--output-prefix", str(tmp_path / "corpus")], check=True, capture_output=True, cwd=ROOT)
    return ["--data-path", str(tmp_path / "corpus"), "--tokenizer-type", "ByteTokenizer"]


def test_resume_after_rollback_replays_the_original_run(tmp_path, data_args):
    save, local = tmp_path / "ckpt", tmp_path / "local"
    args = COMMON + data_args + ["--train-iters", "40", "--save", str(save), "--load", str(save), "--async-save",
                                 "--save-interval", "5", "--ckpt-local-dir", str(local), "--ckpt-local-interval", "5",
                                 "--ckpt-local-retain-last", "100", "--ckpt-persistent-interval", "10"]
    try:
        # Held (GPT_CKPT_HOLD=request): every due version reaches its level however loaded the
        # machine; without it, a version superseded before its flush started is skipped, by design.
        # L0 kept (--ckpt-keep-host-pool): the rollback sets its later versions aside too.
        first = run_pretrain(args + ["--tensorboard-dir", str(tmp_path / "tb1"), "--ckpt-keep-host-pool"],
                             env={"GPT_CKPT_HOLD": "request"}).stdout
        assert "  L1: 8 checkpoints" in first and "  L2: 4 checkpoints" in first, first[-1500:]  # the engine's record
        refused = rollback(23, "--save", save, "--ckpt-local-dir", local, check=False)
        assert refused.returncode == 2 and "no committed checkpoint of iteration 23" in refused.stderr
        assert "[15, 20, 25, 30]" in refused.stderr, refused.stderr
        out = rollback(20, "--save", save, "--ckpt-local-dir", local, "--branch", "first-try").stdout
        assert "L2: tracker 40 -> 20" in out and "L0: version 40 set aside" in out, out
        for level, later in ((save, [30, 40]), (local, [25, 30, 35, 40])):
            assert sorted(p.name for p in (level / "branches" / "first-try").iterdir() if p.name.startswith("iter_")) == \
                [f"iter_{i:07d}" for i in later], "later checkpoints are moved aside, never deleted"
        proc = run_pretrain(args + ["--tensorboard-dir", str(tmp_path / "tb2")])
        assert "loaded iteration 20" in proc.stdout
        first, second = read_scalars(tmp_path / "tb1", "lm loss"), read_scalars(tmp_path / "tb2", "lm loss")
        assert sorted(second) == list(range(21, 41))
        for it in range(21, 41):
            assert second[it] == first[it], it
    finally:
        host_pool.remove_segments(str(save))


def test_list_shows_committed_partial_and_corrupt(tmp_path):
    save = tmp_path / "ckpt"
    run_pretrain(COMMON + ["--mock-data", "--vocab-size", "1024", "--train-iters", "6", "--save", str(save),
                           "--save-interval", "2"])
    os.unlink(save / "iter_0000004" / ".metadata")
    data = save / "iter_0000006" / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size - 100)
    out = rollback("--list", "--save", save, without_torch=True).stdout  # seconds: no torch to import
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("L2 ")}
    assert "committed" in lines["2"] and "partial" in lines["4"] and "corrupt" in lines["6"], out
    assert "truncated" in lines["6"] and "MiB" in lines["2"]
    data.write_bytes(b"\0" * size)  # the right size, the wrong bytes
    relisted = {line.split()[1]: line for line in rollback("--list", "--save", save).stdout.splitlines() if line.startswith("L2 ")}
    assert "committed" in relisted["6"], "a cheap --list checks presence and sizes only"
    assert "checksum mismatch" in rollback("--list", "--save", save, "--verify", without_torch=True).stdout


def test_every_level_honours_a_rollback_it_was_not_told_of_and_a_branch_name_is_not_reused(tmp_path):
    """``rollback.sh 20 --save DIR`` alone (no --ckpt-local-dir, no --ckpt-host-dir): the usual command line
    then resumes from 20, not from L1's or a non-default L0's versions of the abandoned branch
    (``rollbacks.jsonl`` says which they are). A second rollback naming the same --branch is
    refused before anything moves."""
    save, local, host = tmp_path / "ckpt", tmp_path / "local", tmp_path / "shm"
    args = COMMON + ["--mock-data", "--vocab-size", "1024", "--train-iters", "30", "--save", str(save), "--load",
                     str(save), "--async-save", "--save-interval", "1", "--ckpt-local-dir", str(local),
                     "--ckpt-local-interval", "5", "--ckpt-local-retain-last", "100", "--ckpt-persistent-interval",
                     "10", "--ckpt-host-dir", str(host)]
    try:
        run_pretrain(args + ["--ckpt-keep-host-pool"], env={"GPT_CKPT_HOLD": "request"})
        listed = rollback("--list", "--save", save, "--ckpt-host-dir", host, without_torch=True).stdout  # slots: no torch
        assert re.search(r"^L0 +30 +in memory", listed, re.M), listed
        out = rollback(20, "--save", save, "--branch", "b", without_torch=True).stdout
        assert "L2: tracker 30 -> 20" in out and "L1" not in out and "L0" not in out, out
        again = rollback(10, "--save", save, "--branch", "b", check=False)
        assert again.returncode == 2 and "branch 'b' exists already" in again.stderr, again.stderr
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "20", "nothing moved"
        proc = run_pretrain(args + ["--train-iters", "22"])
        assert "loaded iteration 20 from" in proc.stdout, proc.stdout[-3000:]
        assert f"{local / 'iter_0000030'} is of the branch the rollback to 20 abandoned (b); not loaded" in proc.stdout
    finally:
        host_pool.remove_segments(str(save), str(host))
