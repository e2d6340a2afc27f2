"""L0 peer replicas (``--ckpt-peer-replicas K``): each selected L0 version of a rank is also held
in the host memory of K partner ranks on other nodes, so that a lost node resumes from memory.

**Partners.** Nodes are found as the node-local levels find them: by which ranks share the pool
directory (``checkpointing.storage.peers.directory_peers`` on ``--ckpt-host-dir``), numbered by their
lowest rank. Rank ``r``, the ``i``-th rank of node ``n``, sends to the ``i``-th rank of nodes
``(n + 1) mod N`` ... ``(n + K) mod N`` and holds the versions of the ``i``-th rank of nodes
``(n - 1)`` ... ``(n - K)``. Why this rule: every rank sends K and receives K versions (every
node's network and memory carry the same load, as NVIDIA's resiliency extension's
``replication_jump`` of 1 and Gemini's ring placement), and node n's versions are on the K
distinct nodes after it. A rank's version survives unless its node and all K of those are lost:
any K nodes may go at once, and so may more that are not K + 1 neighbours. Two *neighbouring*
nodes lost at once with K = 1 lose node n's own slots and its only replica (on node n + 1):
that is what K = 1 cannot survive.

**Transfer.** The replication is a level of the flusher process (``checkpointing.base.levels.PEER``):
its jobs are queued, superseded and agreed like a flush's, and run on the flushers' own gloo
group, never on the training thread. Every rank's flusher runs the same jobs in the same order,
so one job is one exchange around the ring: each rank sends its slot to its targets and receives
its sources' slots, shard by shard, reporting each shard sent in the control block exactly as a
flush reports what it has read (a zero-copy step waits only for shards not sent yet).

**What a replica is.** A slot of the holder's pool (``host_pool.replica_slot_path``, two per
source: the newest whole replica stays while the next is received) and its description: the
source's own description (version, small state, layout, its pieces and arrays: a
self-describing checkpoint of that rank) plus ``source``, ``holder`` and ``checksum`` (xxh3 of
the slot's bytes in send order, computed by the sender and checked by the receiver before it
writes the description, and again before a resume uses it). Files are private to the user and
checked like every L0 file (``checkpointing.base.private_files``); descriptions are read with
``weights_only`` (``checkpointing.base.safe_pickle``): a planted one is refused, never run.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import xxhash

from checkpointing.base.durable import atomic_write_bytes
from checkpointing.base.errors import CheckpointError
from checkpointing.base.safe_pickle import load_objects
from checkpointing.storage.host_pool import ArraySpec, framed_description, map_arrays

_TAG_LENGTH, _TAG_HEADER, _TAG_DATA, _TAG_TRAILER = 71, 72, 73, 74


class PeerReplicaError(ValueError):
    """``--ckpt-peer-replicas`` cannot work in this job's layout of nodes."""


@dataclass(frozen=True)
class Partners:
    """Where one rank's replicas go and whose it holds."""

    node: int
    """This rank's node (nodes numbered by their lowest rank)."""
    nodes: list[list[int]]
    """Every node's ranks, ascending."""
    targets: tuple[int, ...]
    """The ranks this rank sends its versions to (one per j = 1..K)."""
    sources: tuple[int, ...]
    """The ranks whose versions this rank holds."""


def node_list(node_peers: list[list[int]]) -> list[list[int]]:
    """Every node's ranks from every rank's ``directory_peers`` of the pool directory, numbered
    by their lowest rank."""
    return sorted({tuple(sorted(p)) for p in node_peers}, key=lambda n: n[0])  # type: ignore[return-value]


def replicas_for(node_count: int, k: int, host_dir: str) -> tuple[int, str | None]:
    """The replicas a job of ``node_count`` nodes keeps when ``--ckpt-peer-replicas k`` asks for
    more than it has nodes to hold (a restart on the survivors of a lost node, with the same
    command line): at most one per other node, 0 on one node; and the warning that says so (None
    when ``k`` fits). Refusing would make the user edit the command at the worst moment."""
    if k < node_count:
        return k, None
    fit = node_count - 1
    if fit == 0:
        return 0, (f"WARNING: --ckpt-peer-replicas {k}: every rank of this job shares --ckpt-host-dir {host_dir} "
                   "(one node), where a replica would be lost with the node it protects: no replicas this run "
                   "(they resume on more nodes)")
    return fit, (f"WARNING: --ckpt-peer-replicas {k} needs at least {k + 1} nodes; this job has {node_count}: "
                 f"{fit} replica(s) per version this run")


def partners(node_peers: list[list[int]], rank: int, k: int, host_dir: str) -> Partners:
    """The partners of ``rank`` under the rule above; raises :class:`PeerReplicaError` if the job
    has fewer than K + 1 nodes or nodes of different sizes."""
    nodes = [list(n) for n in node_list(node_peers)]
    if len(nodes) == 1:
        raise PeerReplicaError(
            f"--ckpt-peer-replicas {k}: every rank of this job shares --ckpt-host-dir {host_dir} (one node), so a "
            "replica would be lost with the node it protects; drop the flag, or run on more nodes (each node with "
            "its own host memory)")
    if k >= len(nodes):
        raise PeerReplicaError(f"--ckpt-peer-replicas {k} needs at least {k + 1} nodes; this job has {len(nodes)}: "
                               f"use at most {len(nodes) - 1}")
    sizes = {len(n) for n in nodes}
    if len(sizes) != 1:
        raise PeerReplicaError(f"--ckpt-peer-replicas needs the same number of ranks on every node; this job's nodes "
                               f"have {sorted(len(n) for n in nodes)} (ranks by node: {nodes})")
    node = next(i for i, n in enumerate(nodes) if rank in n)
    local = nodes[node].index(rank)
    count = len(nodes)
    targets = tuple(nodes[(node + j) % count][local] for j in range(1, k + 1))
    sources = tuple(nodes[(node - j) % count][local] for j in range(1, k + 1))
    return Partners(node, nodes, targets, sources)


@dataclass(frozen=True)
class ReplicaSpec:
    """What a flusher needs to replicate (sent once by its trainer, in ``FlusherSpec``)."""

    targets: tuple[int, ...]
    sources: tuple[int, ...]
    source_specs: dict[int, dict[str, ArraySpec]]
    """Each source's flat arrays (their sizes differ between pipeline stages)."""
    source_shards: dict[int, list[tuple[int, int]]]
    """Each source's shards: the order its bytes arrive in."""
    slot_paths: dict[int, list[str]]
    """Each source's replica slot files in this rank's pool."""


def shard_views(arrays: dict[str, torch.Tensor], shards: list[tuple[int, int]]) -> list[list[torch.Tensor]]:
    """The bytes of each shard, array by array, as byte views (the order they are sent in)."""
    return [[array[lo:hi].view(torch.uint8) for array in arrays.values()] for lo, hi in shards]


def slot_checksum(views: list[list[torch.Tensor]]) -> int:
    """xxh3-64 of the views' bytes, in order (a signed 64-bit value, as a tensor holds it)."""
    digest = xxhash.xxh3_64()
    for shard in views:
        for view in shard:
            digest.update(view.numpy())
    return _signed(digest.intdigest())


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class ReplicaExchange:
    """The flusher's side: its sources' replica slots, mapped, and one exchange per version."""

    def __init__(self, spec: ReplicaSpec, rank: int, group):
        self.spec, self.rank, self.group = spec, rank, group
        self.slots = {source: [map_arrays(path, spec.source_specs[source])[1] for path in paths]
                      for source, paths in spec.slot_paths.items()}
        self.newest: dict[int, int | None] = {source: None for source in spec.sources}
        """Each source's slot holding its newest whole replica (None: none yet this run)."""

    def exchange(self, version: int, description: bytes, arrays: dict[str, torch.Tensor],
                 shards: list[tuple[int, int]], sent) -> tuple[int, float, str | None]:
        """Send this rank's slot (``arrays``, described by ``description``) to every target and
        receive every source's version into a replica slot. ``sent(i)``: shard ``i`` is sent (a
        zero-copy step may overwrite it now). Returns (bytes sent, seconds, error: a source's
        replica that arrived damaged, or None)."""
        started = time.perf_counter()
        spec, group = self.spec, self.group
        header = torch.frombuffer(bytearray(description), dtype=torch.uint8)
        lengths = {s: torch.zeros(1, dtype=torch.int64) for s in spec.sources}
        _wait([dist.irecv(lengths[s], src=s, group=group, tag=_TAG_LENGTH) for s in spec.sources]
              + [dist.isend(torch.tensor([header.numel()], dtype=torch.int64), dst=t, group=group, tag=_TAG_LENGTH)
                 for t in spec.targets])
        headers = {s: torch.empty(int(lengths[s].item()), dtype=torch.uint8) for s in spec.sources}
        _wait([dist.irecv(headers[s], src=s, group=group, tag=_TAG_HEADER) for s in spec.sources]
              + [dist.isend(header, dst=t, group=group, tag=_TAG_HEADER) for t in spec.targets])
        # Into the slot not holding the newest whole replica; its description goes first, so a
        # crash mid-receive never leaves it describing half-new bytes.
        into = {s: (0 if self.newest[s] is None else 1 - self.newest[s]) for s in spec.sources}
        for s in spec.sources:
            _unlink(spec.slot_paths[s][into[s]] + ".meta")
        received = {s: shard_views(self.slots[s][into[s]], spec.source_shards[s]) for s in spec.sources}
        receives = [dist.irecv(view, src=s, group=group, tag=_TAG_DATA)
                    for s in spec.sources for shard in received[s] for view in shard]
        digest = xxhash.xxh3_64()
        nbytes = 0
        for index, shard in enumerate(shard_views(arrays, shards)):
            _wait([dist.isend(view, dst=t, group=group, tag=_TAG_DATA) for view in shard for t in spec.targets])
            for view in shard:
                digest.update(view.numpy())
                nbytes += view.numel() * len(spec.targets)
            sent(index)
        trailers = {s: torch.zeros(1, dtype=torch.int64) for s in spec.sources}
        checksum = torch.tensor([_signed(digest.intdigest())], dtype=torch.int64)
        _wait(receives + [dist.irecv(trailers[s], src=s, group=group, tag=_TAG_TRAILER) for s in spec.sources]
              + [dist.isend(checksum, dst=t, group=group, tag=_TAG_TRAILER) for t in spec.targets])
        errors = []
        for s in spec.sources:
            error = self._commit(s, into[s], version, bytes(headers[s].numpy()), int(trailers[s].item()), received[s])
            if error:
                errors.append(error)
        return nbytes, time.perf_counter() - started, "; ".join(errors) or None

    def _commit(self, source: int, index: int, version: int, header: bytes, checksum: int,
                views: list[list[torch.Tensor]]) -> str | None:
        """Check a received replica and write its description (its commit)."""
        path = self.spec.slot_paths[source][index]
        try:
            description, _ = load_objects(header, f"replica header from rank {source}")
        except CheckpointError as error:
            return f"rank {source}'s replica of iteration {version} was refused: {error}"
        if not isinstance(description, dict) or description.get("version") != version:
            return f"rank {source} sent a replica header for another version than {version}; not kept"
        if slot_checksum(views) != checksum:
            return (f"rank {source}'s replica of iteration {version} arrived with a checksum mismatch; not kept "
                    f"({path})")
        description.update(source=source, holder=self.rank, checksum=checksum)
        blob = io.BytesIO()
        torch.save(description, blob)
        atomic_write_bytes(path + ".meta", framed_description(blob.getvalue()), mode=0o600)
        self.newest[source] = index
        return None


def _wait(works) -> None:
    for work in works:
        work.wait()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
