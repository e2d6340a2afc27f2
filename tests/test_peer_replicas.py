"""Peer replicas (``--ckpt-peer-replicas``) and the resume from host memory after a node is lost,
with two nodes on this machine (``tests/launch.run_two_nodes``: each node its own
``--ckpt-host-dir``, L2 shared and, here, still empty when the node goes).

(a) Killed after iteration 9, node B replaced (its shared memory gone): the two-node restart
    resumes from memory (node A's own slots and its replicas of node B's ranks, sent over), not
    from scratch, and replays the losses bit for bit.
(b) The same kill, restarted on node A alone at TP2xDP1: it resumes from memory, resharded, with
    losses within 1e-4 of the uninterrupted run.
(c) A replica file planted by someone else is refused, not read.
(d) A normal end frees the replicas with the rest of the pool.
"""

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.launch import TINY, read_scalars, rollback, run_pretrain, run_two_nodes

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--lr", "3e-3", "--log-interval", "1", "--train-iters", "14", "--tensor-model-parallel-size", "2",
               "--use-distributed-optimizer"]
CKPT = ["--async-save", "--save-interval", "1", "--ckpt-persistent-interval", "100", "--ckpt-peer-replicas", "1"]
# Each request waits until the previous version's jobs (its replication included) are done: what
# a kill after iteration N leaves does not depend on the machine's speed.
HOLD = {"GPT_CKPT_HOLD": "request"}


def _host_dirs() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {name: f"/dev/shm/gptckpt-test-{tag}-node{name}" for name in "AB"}


@pytest.fixture
def nodes():
    hosts = _host_dirs()
    yield hosts
    for host in hosts.values():
        shutil.rmtree(host, ignore_errors=True)


def _files(host: str) -> list[str]:
    return sorted(name for _, _, names in os.walk(host) for name in names)


def _two_nodes(tmp_path, nodes, phase: str, extra: list[str], kill_at: int | None):
    save = tmp_path / "ckpt"
    env = {"GPT_CKPT_FAULT": f"iteration:kill:{kill_at}", **HOLD} if kill_at else {}
    results = run_two_nodes(ARGS + CKPT + extra + ["--save", str(save), "--load", str(save),
                                                   "--tensorboard-dir", str(tmp_path / phase)],
                            [["--ckpt-host-dir", host] for host in nodes.values()], env=env)
    for r in results:
        assert (r.returncode != 0) == bool(kill_at), f"{phase}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return results[1].stdout, read_scalars(tmp_path / phase, "lm loss")


def _killed_at_9(tmp_path, nodes) -> dict[int, float]:
    out, losses = _two_nodes(tmp_path, nodes, "killed", [], kill_at=9)
    assert "peer replicas on 1 other node(s) (2 nodes" in out, out[-3000:]
    assert sorted(losses) == list(range(1, 10))
    assert not os.listdir(tmp_path / "ckpt") or not any(p.startswith("iter_") for p in os.listdir(tmp_path / "ckpt"))
    assert any("-p" in name for name in _files(nodes["A"])), _files(nodes["A"])  # node A holds node B's replicas
    listed = rollback("--list", "--save", tmp_path / "ckpt", "--ckpt-host-dir", nodes["A"], "--ckpt-host-dir", nodes["B"]).stdout
    # HOLD makes version 8's replication whole before iteration 9 runs; version 9's may be partial
    # when the kill comes (then its line names fewer ranks), depending on the machine's speed.
    whole = [int(line.split()[1]) for line in listed.splitlines()
             if line.startswith("replica") and "replicas of ranks 0-3 on 2 node(s)" in line]
    assert whole and max(whole) >= 8, listed
    return losses


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """One two-node run killed after iteration 9, kept aside: (a), (b) and (c) each start from a
    copy of what it left (host dirs and --save, at the same paths), not from a run of their own."""
    run_dir = tmp_path_factory.mktemp("killed")
    hosts = _host_dirs()
    try:
        losses = _killed_at_9(run_dir, hosts)
        kept = tmp_path_factory.mktemp("kept")
        for name, host in hosts.items():
            shutil.copytree(host, kept / name, symlinks=True)
        shutil.copytree(run_dir / "ckpt", kept / "ckpt", symlinks=True)
        yield run_dir, hosts, kept, losses
    finally:
        for host in hosts.values():
            shutil.rmtree(host, ignore_errors=True)


@pytest.fixture
def after_kill(killed_run):
    """What the kill left, restored: (run directory, host dirs, losses of iterations 1-9)."""
    run_dir, hosts, kept, losses = killed_run
    for path, copy in [*((hosts[name], kept / name) for name in hosts), (run_dir / "ckpt", kept / "ckpt")]:
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(copy, path, symlinks=True)
    return run_dir, hosts, losses


def test_node_replaced_resumes_from_memory_bit_for_bit(after_kill):
    """(a)"""
    tmp_path, nodes, killed = after_kill
    shutil.rmtree(nodes["B"])  # node B replaced: its host memory is empty
    out, resumed = _two_nodes(tmp_path, nodes, "resumed", ["--ckpt-keep-host-pool"], kill_at=None)
    assert "is held in host memory" in out and "0 bytes read from --save" in out, out[-4000:]
    assert "rank 2: a replica on node 0" in out and "rank 0: its own L0 slot on node 0" in out, out[-4000:]
    first = min(resumed)
    assert first >= 9, (first, out[-3000:])  # resumed from iteration >= 8
    assert f"loaded iteration {first - 1} from host memory (staged in" in out, out[-3000:]
    for it in range(first, 10):
        assert resumed[it] == killed[it], (it, resumed[it], killed[it])
    assert sorted(resumed) == list(range(first, 15))


def test_node_lost_restart_on_survivors_in_smaller_layout(after_kill):
    """(b)"""
    tmp_path, nodes, killed = after_kill
    save = tmp_path / "ckpt"
    from checkpointing.storage.host_pool import job_tag

    stale = Path(nodes["A"]) / f"gptckpt-{os.getuid()}" / f"recovery-{job_tag(str(save))}-deadbeef" / "iter_0000005"
    stale.mkdir(parents=True)  # staging of a run killed midway
    proc = run_pretrain(ARGS + CKPT[:-2] + ["--save", str(save), "--load", str(save), "--ckpt-host-dir", nodes["A"],
                                            "--tensorboard-dir", str(tmp_path / "survivors")], nproc=2)
    out = proc.stdout
    assert "is held in host memory (TP2xDP2 saved it)" in out and "0 bytes read from --save" in out, out[-4000:]
    assert f"removed {stale.parent}, staging left by an earlier run of this job" in out and not stale.parent.exists()
    resumed = read_scalars(tmp_path / "survivors", "lm loss")
    first = min(resumed)
    assert first >= 9, (first, out[-3000:])
    for it in range(first, 10):
        assert abs(resumed[it] - killed[it]) <= 1e-4 * abs(killed[it]), (it, resumed[it], killed[it])


def test_planted_replica_is_refused(after_kill):
    """(c): a replica description another user could have written (group/other-writable here;
    owned by another uid under root, tests/test_private_files.py) is refused, never read."""
    tmp_path, nodes, _ = after_kill
    metas = [os.path.join(root, n) for root, _, names in os.walk(nodes["A"]) for n in names
             if "-p" in n and n.endswith(".meta")]
    assert metas
    for meta in metas:
        os.chmod(meta, 0o666)
    shutil.rmtree(nodes["B"])
    out, _ = _two_nodes(tmp_path, nodes, "planted", [], kill_at=None)
    assert "refused" in out and "not used" in out, out[-4000:]
    assert "is held in host memory" not in out
    assert "host memory cannot serve a resume" in out, out[-4000:]


def test_replicas_freed_at_normal_end(tmp_path, nodes):
    """(d)"""
    _, losses = _two_nodes(tmp_path, nodes, "normal", ["--train-iters", "4"], kill_at=None)
    assert sorted(losses) == [1, 2, 3, 4]
    for host in nodes.values():
        assert not [f for f in _files(host) if f.startswith("gptckpt-")], _files(host)


def test_one_node_trains_without_replicas_and_says_so(tmp_path):
    """The survivors of a lost node restarted with the same command line: no replicas, one
    warning, training goes on (it was refused, making the user edit the command)."""
    proc = run_pretrain(ARGS + CKPT + ["--save", str(tmp_path / "ckpt"), "--train-iters", "2"], nproc=2)
    assert "every rank of this job shares --ckpt-host-dir" in proc.stdout and "no replicas this run" in proc.stdout
    assert "replicas on" not in proc.stdout and "training done: 2 iterations" in proc.stdout
