"""Another user of the node cannot run code as the training user, or feed it a snapshot, through
the checkpoint: a job killed with its L0 pool in shared memory, whose small files are then
replaced by another owner's pickles, restarts without reading them; a tampered checkpoint
``.metadata`` is refused without running it."""

import os
import pickle

import pytest
import torch

from checkpointing.storage import host_pool
from tests.helpers import PickleMarker
from tests.launch import TINY, run_pretrain

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
               "--lr", "3e-3", "--log-interval", "1", "--train-iters", "6"]
NOBODY = 65534


@pytest.fixture
def ckpt(tmp_path):
    directory = tmp_path / "ckpt"
    yield directory
    host_pool.remove_segments(str(directory))


@pytest.mark.skipif(os.getuid() != 0, reason="making a file another user's needs root (chown)")
def test_planted_snapshot_descriptions_are_refused_and_never_run(ckpt, tmp_path):
    common = ARGS + ["--save", str(ckpt), "--load", str(ckpt), "--async-save", "--save-interval", "1",
                     "--ckpt-persistent-interval", "2"]
    killed = run_pretrain(common, check=False, env={"GPT_CKPT_FAULT": "iteration:kill:3", "GPT_CKPT_HOLD": "request"})
    assert killed.returncode != 0
    descriptions = [p for p in host_pool.list_segments(host_pool.job_tag(str(ckpt))) if p.endswith(".meta")]
    assert descriptions, "the killed job left its snapshots in shared memory"
    marker = tmp_path / "marker"
    for path in descriptions:  # another user's files, whose loading would run code
        with open(path, "wb") as f:
            torch.save({"version": 99, "objects": PickleMarker(marker), "layout": {}}, f)
        os.chown(path, NOBODY, NOBODY)
    proc = run_pretrain(common)
    assert not marker.exists(), "a planted pickle ran"
    assert "refused: it is owned by uid 65534" in proc.stdout and "not read" in proc.stdout, proc.stdout[-3000:]
    assert "from L0" not in proc.stdout
    assert "loaded iteration 2 from" in proc.stdout  # the newest L2 version, on disk
    assert "training done: 6 iterations" in proc.stdout


def test_a_tampered_metadata_is_refused_without_running_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_pretrain(ARGS + ["--train-iters", "2", "--save", str(ckpt), "--save-interval", "2"])
    marker = tmp_path / "marker"
    (ckpt / "iter_0000002" / ".metadata").write_bytes(pickle.dumps(PickleMarker(marker)))
    proc = run_pretrain(ARGS + ["--load", str(ckpt)], check=False)  # its checksum no longer matches: damaged
    assert proc.returncode != 0 and not marker.exists()
    assert "do not match their checksum" in proc.stdout + proc.stderr
    (ckpt / "iter_0000002" / ".metadata.xxh3").unlink()  # a planter who knows the format removes the checksum
    proc = run_pretrain(ARGS + ["--load", str(ckpt)], check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert "names io.open, which is not part of DCP's metadata" in proc.stdout + proc.stderr
    assert "--trust-checkpoint-pickles" in proc.stdout + proc.stderr
