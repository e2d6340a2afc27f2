"""Two nodes on one machine, each with its own L0 (``--ckpt-host-dir``) and L1 (``--ckpt-local-dir``),
L2 shared.

One job, killed twice and restarted:
1. killed at 11 (two ``torchrun --nnodes 2`` launchers, a c10d rendezvous on 127.0.0.1): L1 holds
   4 and 8 on both nodes, L2 nothing yet;
2. every node rebooted (L0 gone, disks kept): resumes from node-local L1, each rank from its own
   node's files; killed at 16;
3. node B replaced (its L0 and L1 gone, node A's intact and newer): every rank agrees on L2.
Each resume replays the losses of the run it resumed, bit for bit, over the iterations both ran
(phase 1 is the uninterrupted run from scratch up to 11). Phases 2 and 3 fork each node's ranks
from the tests' warm zygote (``tests/launch.run_two_nodes``): what they test is the resume, and a
torchrun launch costs every rank a fresh interpreter. The Slurm test below launches through torchrun too.
"""

import shutil
import uuid

import pytest

from checkpointing.format.discovery import list_checkpoints
from checkpointing.recovery.inventory import check_directory, l0_entries
from tests.launch import TINY, read_scalars, run_two_nodes

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--lr", "3e-3", "--log-interval", "1", "--train-iters", "20", "--tensor-model-parallel-size", "2",
               "--use-distributed-optimizer"]
CKPT = ["--async-save", "--save-interval", "1", "--ckpt-local-interval", "4", "--ckpt-persistent-interval", "12"]
# Held (checkpointing/base/faults.py): each request waits until the previous version is in L0 and every
# earlier flush is done, so what a kill after iteration N leaves does not depend on the machine's
# speed: L0 holds N-1 (and N if its copy landed), every level each due version before N.
HOLD = {"GPT_CKPT_HOLD": "request"}


def _committed(root) -> list[int]:
    return [c.iteration for c in list_checkpoints(str(root)) if c.committed]


def _same_losses(run: dict[int, float], earlier: dict[int, float], first: int, last: int, overlap) -> None:
    """``run`` logged ``first``..``last``, and equals ``earlier`` bit for bit over ``overlap``."""
    assert sorted(run) == list(range(first, last + 1)), sorted(run)
    for it in range(overlap[0], overlap[1] + 1):
        assert run[it] == earlier[it], (it, run[it], earlier[it])


@pytest.fixture
def nodes(tmp_path):
    tag = uuid.uuid4().hex[:8]
    dirs = {name: {"local": tmp_path / f"node{name}" / "local", "host": f"/dev/shm/gptckpt-test-{tag}-node{name}"}
            for name in "AB"}
    yield dirs
    for d in dirs.values():
        shutil.rmtree(d["host"], ignore_errors=True)


def test_two_nodes_resume_from_node_local_then_from_shared_level(tmp_path, nodes):
    save = tmp_path / "shared" / "ckpt"
    common = ARGS + CKPT + ["--save", str(save), "--load", str(save)]
    per_node = [["--ckpt-local-dir", str(d["local"]), "--ckpt-host-dir", d["host"]] for d in nodes.values()]
    local_a, local_b = nodes["A"]["local"], nodes["B"]["local"]

    def run(phase: str, kill_at: int | None, torchrun: bool = False):
        env = {"GPT_CKPT_FAULT": f"iteration:kill:{kill_at}", **HOLD} if kill_at else {}
        results = run_two_nodes(common + ["--tensorboard-dir", str(tmp_path / phase)], per_node, env=env,
                                torchrun=torchrun)
        for r in results:
            assert (r.returncode != 0) == bool(kill_at), f"{phase}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return results[1].stdout  # node B runs the last rank, which logs

    # 1. Killed at 11: each node's L1 holds its own ranks' files of 4 and 8.
    out = run("phase1", kill_at=11, torchrun=True)
    assert "L1" in out and "node-local (2 nodes)" in out, out[-3000:]
    phase1 = read_scalars(tmp_path / "phase1", "lm loss")
    assert sorted(phase1) == list(range(1, 12)), sorted(phase1)
    assert _committed(local_a) == _committed(local_b) == [4, 8], (_committed(local_a), _committed(local_b))
    assert _committed(save) == []
    assert sorted(p.name for p in (local_a / "iter_0000008").iterdir()) == [".metadata", ".metadata.xxh3", "__0_0.distcp", "__1_0.distcp"]
    state, detail = check_directory(str(local_b / "iter_0000008"), verify=True)
    assert (state, detail) == ("committed", "node-local: this node's 2 of the job's data files")

    # 2. Every node rebooted (shared memory gone, disks kept): each rank restores from its node's L1.
    for d in nodes.values():
        shutil.rmtree(d["host"])
    out = run("phase2", kill_at=16)
    assert f"loaded iteration 8 from {local_b / 'iter_0000008'}" in out, out[-3000:]
    phase2 = read_scalars(tmp_path / "phase2", "lm loss")
    _same_losses(phase2, phase1, 9, 16, overlap=(9, 11))
    assert _committed(save) == [12]

    # 3. Node B replaced: its shared memory and local disk are empty. Node A still holds newer
    # versions (L0 15, or 16, L1 12), but every rank must load the same one: L2's 12.
    assert max(e.iteration for e in l0_entries(str(save), nodes["A"]["host"])) >= 15
    shutil.rmtree(nodes["B"]["host"])
    shutil.rmtree(local_b)
    out = run("phase3", kill_at=None)
    assert f"loaded iteration 12 from {save / 'iter_0000012'}" in out, out[-3000:]
    _same_losses(read_scalars(tmp_path / "phase3", "lm loss"), phase2, 13, 20, overlap=(13, 16))


def test_slurm_batch_script_runs_two_nodes(tmp_path):
    """``scripts/slurm_pretrain_gpt.sbatch`` under stand-ins of ``srun`` and ``scontrol`` that make
    this machine two nodes: it trains, each node's L1 holds its own rank's file, L2 the whole."""
    import os
    import subprocess

    from checkpointing.storage import host_pool
    from tests.helpers import free_port
    from tests.launch import ROOT

    save = tmp_path / "ckpt"
    env = dict(os.environ, PATH=f"{ROOT / 'tests' / 'slurm_stub'}:{os.environ['PATH']}", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="stub[0-1]", SLURM_JOB_ID="4242", SLURM_JOB_NAME="stub", SLURM_SUBMIT_DIR=str(tmp_path),
               STUB_NODE_ROOT=str(tmp_path), GPUS_PER_NODE="1", CKPT_DIR=str(save), RDZV_PORT=str(free_port()),
               MAX_RESTARTS="0", PYTHON=os.environ.get("PYTHON", __import__("sys").executable),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPT_FORCE_CPU="1", **HOLD)  # L1 gets 3, not only 6
    args = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
                   "--train-iters", "6", "--lr", "3e-3", "--ckpt-local-interval", "3"]
    try:
        proc = subprocess.run(["bash", "scripts/slurm_pretrain_gpt.sbatch", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        host_pool.remove_segments(str(save))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _committed(save) == [6]
    for node in (0, 1):
        local = tmp_path / f"node{node}" / "local"
        assert _committed(local) == [3, 6], node
        assert sorted(p.name for p in (local / "iter_0000006").iterdir()) == [".metadata", ".metadata.xxh3", f"__{node}_0.distcp"]
