"""The peer-replica partner rule and the replica area's place in the host budget (no processes)."""

import pytest
import torch

from checkpointing.storage.host_pool import REPLICA_SLOTS, ArraySpec, HostPool, remove_pool, slot_bytes
from checkpointing.storage.peer_replicas import PeerReplicaError, partners

FOUR_NODES = [[0, 1], [2, 3], [4, 5], [6, 7]]


def _peers(nodes):
    return [next(n for n in nodes if r in n) for r in range(sum(map(len, nodes)))]


def test_same_local_rank_on_the_next_k_nodes():
    p = partners(_peers(FOUR_NODES), 3, 2, "/dev/shm")
    assert (p.node, p.targets, p.sources) == (1, (5, 7), (1, 7))
    # every rank sends K and receives K: the ring is balanced
    for k in (1, 2, 3):
        sent = [t for r in range(8) for t in partners(_peers(FOUR_NODES), r, k, "/dev/shm").targets]
        assert sorted(sent) == sorted(list(range(8)) * k)
        for r in range(8):
            p = partners(_peers(FOUR_NODES), r, k, "/dev/shm")
            assert all(t not in FOUR_NODES[p.node] for t in p.targets)  # never on its own node


def test_layouts_of_nodes_that_cannot_hold_replicas_are_refused():
    with pytest.raises(PeerReplicaError, match="one node"):
        partners(_peers([[0, 1, 2, 3]]), 0, 1, "/dev/shm")
    with pytest.raises(PeerReplicaError, match="at least 3 nodes"):
        partners(_peers([[0, 1], [2, 3]]), 0, 2, "/dev/shm")
    with pytest.raises(PeerReplicaError, match="same number of ranks"):
        partners(_peers([[0, 1, 2], [3]]), 0, 1, "/dev/shm")


def test_replicas_count_against_the_host_budget(tmp_path):
    specs = {"main": ArraySpec(1 << 18, torch.float32)}  # 1 MiB a slot
    per_slot = slot_bytes(specs)
    budget = per_slot * 4
    pool = HostPool("t", 0, specs, 8, budget, str(tmp_path), replica_specs={1: specs})
    try:
        assert len(pool.slots) == 4 - REPLICA_SLOTS and pool.replica_bytes == REPLICA_SLOTS * per_slot
        assert pool.bytes + pool.replica_bytes <= budget
        assert [len(s) for s in pool.replica_slots.values()] == [REPLICA_SLOTS]
    finally:
        remove_pool(pool)
    with pytest.raises(ValueError, match="beside .* of peer replicas"):
        HostPool("t", 0, specs, 8, per_slot * REPLICA_SLOTS, str(tmp_path), replica_specs={1: specs})


def test_memory_inventory_skips_what_a_rollback_abandoned(tmp_path):
    """A version above a rollback's step, described before the rollback, is of the abandoned
    branch: a resume from memory must not bring it back (another node's slots and replicas are
    out of rollback.sh's reach)."""
    import time

    from checkpointing.base import private_files
    from checkpointing.base.parallel_layout import ParallelLayout
    from checkpointing.format.items import TensorPiece
    from checkpointing.recovery.memory_recovery import scan
    from checkpointing.storage import host_pool

    specs = {"main": ArraySpec(16, torch.float32)}
    layout = ParallelLayout(1, 1, 2, True, 2, False)
    piece = TensorPiece("w", "main", 0, (16,), (16,), (0,))
    directory, _ = private_files.pool_dir(str(tmp_path))
    tag = host_pool.job_tag("/job")
    for name, version, extra in (("r0-s0", 7, {}), ("r0-p1-s0", 9, {"source": 1})):
        path = f"{directory}/{host_pool.PREFIX}{tag}-{name}"
        with open(path, "wb") as f:
            f.write(b"\0" * slot_bytes(specs))
        with open(path + ".meta", "wb") as f:
            f.write(host_pool.framed_description(host_pool.description_blob(version, {}, layout, [piece], specs, **extra)))
    notes = []
    assert sorted(h.version for h in scan(str(tmp_path), tag, notes)) == [7, 9] and not notes
    rolled = [{"step": 8, "time": time.time() + 1.0, "branch": "b"}]
    held = scan(str(tmp_path), tag, notes, rolled)
    assert [(h.version, h.replica) for h in held] == [(7, False)]
    assert any("a rollback abandoned" in n for n in notes)


def test_fewer_nodes_than_replicas_keep_fewer_and_say_so():
    from checkpointing.storage.peer_replicas import replicas_for

    assert replicas_for(4, 2, "/dev/shm") == (2, None)
    k, warning = replicas_for(2, 2, "/dev/shm")
    assert k == 1 and "needs at least 3 nodes; this job has 2: 1 replica(s) per version" in warning
    k, warning = replicas_for(1, 1, "/dev/shm")
    assert k == 0 and "one node" in warning and "no replicas this run" in warning
