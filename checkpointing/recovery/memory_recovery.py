"""Resume from host memory anywhere in the job: own L0 slots and peer replicas, in the layout that
saved them or resharded into another (a node lost is served from memory: ``docs/architecture.md``, "What a run resumes from").

After a node is replaced, its ranks have nothing in their pool, but the ranks of the next K nodes
hold replicas of their versions (``checkpointing.storage.peer_replicas``). After a node is gone for good,
the survivors hold their own slots and the replicas of the lost node's ranks. Either way the
state of every rank of some version may be *somewhere* in the job's host memory.

:func:`prepare` runs in the training process before the engine opens its pool (a pool in
another layout reuses the slot files), collective over the checkpoint group:

1. **Inventory.** Each node's first rank lists the job's slots and replicas in its pool
   directory (descriptions read with the L0 rules: this user's files alone, ``weights_only``).
   A version is servable from memory when every rank of the layout that saved it has its state
   there, own or replica. The newest servable one is chosen (``--ckpt-step``: that one), unless
   the shared level holds a newer one, or every rank holds it in its own slot in this layout
   (the loader's plain L0 path restores that without a copy).
2. **Staging.** Each held state is written by a rank of the node that holds it, with the
   ordinary writer, as that saved rank's data file of a checkpoint directory in the node's pool
   directory (a tmpfs: memory to memory; a replica's checksum is verified first). The
   coordinator builds the global metadata from every file's records, and every node gets it.
3. **Network.** Each rank finds the files its pieces in *this* layout need (the reader's load
   planning); a file its node does not hold is sent by its holder to the node's first rank over
   the checkpoint group (point to point, in one global order: no cycle can wait).
4. The loader then reads the staged directory as it reads the shared level: resharded, every
   checksum verified (``checkpointing.recovery.loading``, level ``memory``). Nothing is read from
   ``--save``. The staged copies are removed after the load, whatever its outcome.

When a version cannot be served (a rank whose state nobody holds, a damaged replica), the reason
is logged and the loader goes on to the disk levels.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from checkpointing.base import private_files
from checkpointing.base.agreement import gather_from_all
from checkpointing.base.config import CheckpointConfig
from checkpointing.base.errors import CheckpointCorruptError, CheckpointError
from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.format import keys
from checkpointing.format.discovery import iteration_dir, load_candidates
from checkpointing.format.items import CheckpointableState
from checkpointing.format.metadata import build_metadata, write_metadata
from checkpointing.format.writer import write_rank_file
from checkpointing.recovery.rollback import rollbacks
from checkpointing.storage import host_pool
from checkpointing.storage.peer_replicas import node_list, shard_views, slot_checksum
from checkpointing.storage.peers import directory_peers

_OWN = re.compile(r"-r(\d+)-s\d+\.meta$")
_REPLICA = re.compile(r"-r(\d+)-p(\d+)-s\d+\.meta$")


@dataclass(frozen=True)
class HeldState:
    """One saved rank's state of one version, in some node's host memory."""

    version: int
    source: int
    """The rank whose state it is, in the layout that saved it."""
    layout: tuple
    """That layout (``ParallelLayout.to_dict()`` items)."""
    meta_path: str
    replica: bool
    """A peer replica (else the source's own L0 slot)."""
    node: int = -1
    """Index of the node holding it (nodes numbered by their lowest rank)."""

    @property
    def path(self) -> str:
        return self.meta_path[: -len(".meta")]

    def where(self, nodes: list[list[int]]) -> str:
        kind = "a replica" if self.replica else "its own L0 slot"
        return f"{kind} on node {self.node} (ranks {nodes[self.node][0]}-{nodes[self.node][-1]})"


def scan(host_dir: str, tag: str, notes: list[str], rolled_back: list[dict] = ()) -> list[HeldState]:
    """Every described slot and replica of job ``tag`` in this node's pool directories.
    ``rolled_back``: the job's rollbacks (``checkpointing.recovery.rollback.rollbacks``): a version above
    one's step described before it is of the abandoned branch."""
    found = []
    for meta in host_pool.list_segments(tag, host_dir):
        own, replica = _OWN.search(meta), _REPLICA.search(meta)
        if not meta.endswith(".meta") or not (own or replica):
            continue
        try:
            description = host_pool.read_description(meta)
        except (private_files.UnsafePathError, CheckpointError) as error:
            notes.append(f"WARNING: host memory: {error}; not used")
            continue
        if description is None or "pieces" not in description or "arrays" not in description:
            continue  # written before slots described their pieces: only the plain L0 path reads it
        source = int(replica.group(2)) if replica else int(own.group(1))
        if replica and description.get("source") != source:
            notes.append(f"WARNING: host memory: {meta} names source {description.get('source')}, its file name "
                         f"{source}; not used")
            continue
        why = private_files.problem(meta[: -len(".meta")])
        if why is not None:
            notes.append(f"WARNING: host memory: {meta[: -len('.meta')]} refused: {why}; not used")
            continue
        if any(r["step"] < description["version"] and os.path.getmtime(meta) < r["time"] for r in rolled_back):
            notes.append(f"> checkpoint: host memory: {meta} holds iteration {description['version']}, of the branch "
                         "a rollback abandoned; not used")
            continue
        layout = tuple(sorted(description["layout"].items()))
        found.append(HeldState(int(description["version"]), source, layout, meta, bool(replica)))
    return found


@dataclass
class MemoryCandidate:
    """A version staged from host memory, ready for the loader (this rank's node's copy)."""

    version: int
    directory: str
    """The staged ``iter_N`` directory on this rank's node."""
    root: str
    """Its parent: removed by :meth:`remove` on each node's first rank."""
    leader: bool
    lines: list[str] = field(default_factory=list)
    """Where each saved rank's state came from (for the log)."""
    network_bytes: int = 0
    """Bytes the job sent between nodes to stage it."""

    def remove(self) -> None:
        if self.leader:
            shutil.rmtree(self.root, ignore_errors=True)


def _choose(held: list[HeldState], step: int | None) -> tuple[int, tuple, dict[int, HeldState]] | tuple[None, str, None]:
    """(version, layout, source -> state) of the newest version every saved rank has somewhere,
    own slots preferred; or (None, why not, None)."""
    by_version: dict[tuple[int, tuple], dict[int, HeldState]] = {}
    for h in sorted(held, key=lambda h: (h.replica, h.node)):  # own slots first
        by_version.setdefault((h.version, h.layout), {}).setdefault(h.source, h)
    best_partial = None
    for (version, layout), sources in sorted(by_version.items(), key=lambda kv: -kv[0][0]):
        if step is not None and version != step:
            continue
        saved = dict(layout)
        world = saved.get("tensor_parallel", 0) * saved.get("pipeline_parallel", 0) * saved.get("data_parallel", 0)
        missing = sorted(set(range(world)) - set(sources))
        if world and not missing:
            return version, layout, sources
        if best_partial is None:
            best_partial = f"iteration {version} is held for {len(sources)} of its {world} ranks (none holds ranks " \
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''})"
    if best_partial is not None:
        return None, best_partial, None
    return None, "no version is held in host memory" if step is None else f"iteration {step} is not held in host memory", None


def prepare(cfg: CheckpointConfig, state: CheckpointableState, group, log: Callable[[str], None]) -> MemoryCandidate | None:
    """Stage the newest version servable from host memory (see the module's steps); None when
    there is none, or when the plain L0 path or a newer checkpoint on disk serves better."""
    rank = dist.get_rank(group)
    directory, _ = private_files.pool_dir(cfg.host_dir)
    nodes = [list(n) for n in node_list(gather_from_all(group, directory_peers(directory, group)))]
    node = next(i for i, n in enumerate(nodes) if rank in n)
    leader = nodes[node][0] == rank
    notes: list[str] = []
    mine = [HeldState(h.version, h.source, h.layout, h.meta_path, h.replica, node)
            for h in scan(cfg.host_dir, host_pool.job_tag(cfg.save), notes, rollbacks(cfg.load))] if leader else []
    everyone = gather_from_all(group, (notes, mine))  # the node's first rank scanned it; the logging rank says so
    for node_notes, _ in everyone:
        for note in node_notes:
            log(note)
    held = [h for _, states in everyone for h in states]
    if not held:
        return None
    version, layout, chosen = _choose(held, cfg.ckpt_step)
    if version is None:
        log(f"> checkpoint: host memory cannot serve a resume: {layout}; the disk levels are tried")
        return None
    current = tuple(sorted(state.layout.to_dict().items()))
    world = dist.get_world_size(group)
    own_everywhere = layout == current and all(
        not chosen[r].replica and rank_of_node(nodes, chosen[r].node, r) for r in range(world))
    if own_everywhere:
        return None  # every rank restores its own slot (the loader's L0 path): nothing to stage
    on_disk = load_candidates(cfg.load, cfg.ckpt_step)[0] if cfg.load else []
    if on_disk and on_disk[0].iteration > version:
        log(f"> checkpoint: host memory holds iteration {version} at most; {cfg.load} holds {on_disk[0].iteration}, "
            "which is newer")
        return None
    return _stage(cfg, state, group, log, nodes, node, leader, directory, version, layout, chosen)


def rank_of_node(nodes: list[list[int]], node: int, rank: int) -> bool:
    return rank in nodes[node]


def _stage(cfg, state, group, log, nodes, node, leader, directory, version, layout, chosen) -> MemoryCandidate | None:
    started = time.perf_counter()
    rank = dist.get_rank(group)
    token = gather_from_all(group, uuid.uuid4().hex[:8])[0]
    prefix = f"recovery-{host_pool.job_tag(cfg.save)}-"
    root = os.path.join(directory, f"{prefix}{token}")
    staged = iteration_dir(root, version)
    stale: list[str] = []
    if leader:
        # Staging left by a run of this job killed midway: this job holds the job's locks
        # (checkpointing.base.job_lock), so no other run is using it.
        for entry in os.scandir(directory):
            if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
                stale.append(entry.path)
        os.makedirs(staged, mode=0o700)
    # Each node's states are staged by its ranks in turn (a node holds its ranks' and its sources').
    holders = {}
    for i, (source, h) in enumerate(sorted(chosen.items())):
        ranks = nodes[h.node]
        holders[source] = ranks[i % len(ranks)]
    removed = [path for paths in gather_from_all(group, stale) for path in paths]  # and the directories exist
    records, error = [], None
    for source, h in sorted(chosen.items()):
        if holders[source] != rank:
            continue
        try:
            records += _stage_one(h, staged)
        except (OSError, CheckpointError) as e:
            error = f"rank {rank}: {h.path}: {e}"
            break
    gathered = gather_from_all(group, error or records)
    errors = [g for g in gathered if isinstance(g, str)]
    candidate = MemoryCandidate(version, staged, root, leader)
    if errors:
        log(f"WARNING: host memory cannot serve iteration {version}: {'; '.join(errors)}; the disk levels are tried")
        gather_from_all(group, None)
        candidate.remove()
        return None
    try:
        metadata = None
        if rank == 0:
            metadata = build_metadata([r for rs in gathered for r in rs], version, dict(layout), None)
        shared = [metadata]
        dist.broadcast_object_list(shared, src=0, group=group)
        if leader:
            write_metadata(staged, shared[0])
        gather_from_all(group, None)
        candidate.network_bytes = _ship_missing(group, nodes, node, staged, state, holders, version)
    except BaseException:
        candidate.remove()  # no staging left behind in host memory, whatever stopped it
        raise
    nodes_line = ", ".join(f"rank {s}: {chosen[s].where(nodes)}" for s in sorted(chosen)[:16])
    more = f", ... ({len(chosen)} saved ranks)" if len(chosen) > 16 else ""
    candidate.lines = [f"> removed {path}, staging left by an earlier run of this job" for path in removed] + [
        f"> checkpoint: iteration {version} is held in host memory ({ParallelLayout.from_dict(dict(layout)).describe()}"
        f" saved it): {nodes_line}{more}",
        f"> checkpoint: staged from host memory in {time.perf_counter() - started:.2f} s "
        f"({candidate.network_bytes / 1e6:.1f} MB sent between nodes, 0 bytes read from --save)"]
    return candidate


def _stage_one(h: HeldState, staged: str) -> list:
    """Write one held state as its saved rank's data file of ``staged``; returns the records."""
    description = host_pool.read_description(h.meta_path)
    if description is None or description["version"] != h.version:
        raise CheckpointCorruptError(f"its description changed or went away while staging (iteration {h.version})")
    specs = host_pool.decode_specs(description["arrays"])
    private_files.check(h.path)
    if os.path.getsize(h.path) != host_pool.slot_bytes(specs):
        raise CheckpointCorruptError(f"{h.path} is {os.path.getsize(h.path)} bytes, its description says "
                                     f"{host_pool.slot_bytes(specs)}")
    _, arrays = host_pool.map_arrays(h.path, specs)
    if h.replica:
        shards = [tuple(s) for s in description.get("shards", [])]
        if slot_checksum(shard_views(arrays, shards)) != description.get("checksum"):
            raise CheckpointCorruptError(f"replica of rank {h.source}, iteration {h.version}: checksum mismatch")
    pieces = host_pool.decode_pieces(description["pieces"], h.meta_path)
    return write_rank_file(staged, h.source, arrays, pieces, dict(description["objects"]))


def _ship_missing(group, nodes, node, staged, state, holders, version) -> int:
    """Send each node the staged files its ranks' pieces need and it lacks; returns the bytes sent
    in the job (every rank returns the same total)."""
    from checkpointing.format.reader import CheckpointReader

    rank = dist.get_rank(group)
    reader = CheckpointReader(staged, verify=False)
    files = reader.files_for(list(state.load_pieces))
    rng = reader.object_file(keys.rng_key(rank))
    if rng is not None:
        files.add(rng)
    present = set(os.listdir(staged))
    wanted = gather_from_all(group, (node, sorted(files - present)))
    transfers = sorted({(name, n) for n, missing in wanted for name in missing})
    total = 0
    for name, to_node in transfers:
        source = int(name[2:].split("_")[0])
        sender, receiver = holders[source], nodes[to_node][0]
        if rank == sender:
            with open(os.path.join(staged, name), "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst=receiver, group=group)
            dist.send(data, dst=receiver, group=group)
        elif rank == receiver:
            length = torch.zeros(1, dtype=torch.int64)
            dist.recv(length, src=sender, group=group)
            data = torch.empty(int(length.item()), dtype=torch.uint8)
            dist.recv(data, src=sender, group=group)
            fd = private_files.create_new(os.path.join(staged, name), 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data.numpy().tobytes())
        total += os.path.getsize(os.path.join(staged, name)) if rank in (sender, receiver) else 0
    return sum(gather_from_all(group, total)) // 2
