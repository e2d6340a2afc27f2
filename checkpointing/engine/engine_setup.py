"""The engine as a job's configuration asks for it: its pool, its levels and their intervals,
peer-replica partners, and one line that says what was set up."""

from __future__ import annotations

import torch.distributed as dist

from checkpointing.base.levels import L1, L2, PEER, Level
from checkpointing.engine.checkpoint_engine import CheckpointEngine
from checkpointing.format.items import CheckpointableState
from checkpointing.storage.host_pool import ArraySpec, HostPool, job_tag, slot_bytes
from checkpointing.storage.peer_replicas import Partners, ReplicaSpec, partners


def engine_for_config(cfg, state: CheckpointableState, group, log, tracer=None,
                      local_peers: list[int] | None = None) -> CheckpointEngine:
    """``cfg``: a ``CheckpointConfig``; ``local_peers``: the ranks sharing this rank's
    ``--ckpt-local-dir`` (its node). ``cfg.snapshot`` ``auto`` takes zero-copy snapshots where the
    state can (``state.zero_copy_refusal`` is None), ``zero-copy`` insists."""
    refusal = state.zero_copy_refusal
    zero_copy = cfg.snapshot != "copy" and refusal is None
    if cfg.snapshot == "zero-copy" and not zero_copy:
        raise ValueError(f"--ckpt-snapshot zero-copy: {refusal}; use --ckpt-snapshot copy (or auto)")
    specs = {name: ArraySpec(a.numel(), a.dtype) for name, a in state.arrays.items()}
    budget = int(cfg.host_budget_gb * 2**30) if cfg.host_budget_gb else None
    # Zero-copy: one slot more than the versions kept, for the step being written.
    slots = cfg.host_versions + 1 if zero_copy else cfg.host_versions
    mine, replica_specs, source_shards = None, None, None
    if cfg.peer_replicas:
        mine, replica_specs, source_shards = _replica_partners(cfg, specs, list(state.shards), group, log)
    pool = HostPool(job_tag(cfg.save), dist.get_rank(group), specs, slots, budget, cfg.host_dir, replica_specs)
    rate = cfg.write_rate_limit_mb * 1e6 if cfg.write_rate_limit_mb else None
    levels = []
    replicas = None
    if mine is not None:
        replicas = ReplicaSpec(mine.targets, mine.sources, replica_specs, source_shards,
                               {s: [slot.path for slot in held] for s, held in pool.replica_slots.items()})
        levels.append(Level(PEER, pool.directory, cfg.replica_interval, None))  # first: memory before disks
    if cfg.local_dir:
        levels.append(Level(L1, cfg.local_dir, cfg.local_interval, cfg.local_retain_last, local_peers, rate))
    levels.append(Level(L2, cfg.save, cfg.l2_interval, cfg.save_retain_last, None, rate))
    engine = CheckpointEngine(state, pool, levels, group, log, tracer, zero_copy, cfg.flusher_timeout, replicas,
                              cfg.flusher_start)
    how = "zero-copy: steps write into the pool" if zero_copy else "copied at each request"
    where = {PEER: (f"replicas on {len(mine.targets)} other node(s) ({len(mine.nodes)} nodes; rank {engine.rank} "
                    f"sends to ranks {list(mine.targets)}, holds ranks {list(mine.sources)}: "
                    f"{pool.replica_bytes / 2**30:.2f} GiB)") if mine else ""}
    log(f"> async checkpointing: L0 {len(pool.slots)} slots in shared memory ({pool.bytes / 2**30:.2f} GiB "
        f"per rank; {how}); " + "; ".join(f"{lv.name} {where.get(lv.name, lv.root)} every {lv.interval}"
                                         for lv in levels)
        + (f"; writes at most {cfg.write_rate_limit_mb:g} MB/s per rank" if rate else "")
        + f"; flusher process {engine.flusher.how_started}, starting beside the model's load")
    for warning in every_iteration_warnings(levels, slot_bytes(specs), engine.rank):
        log(warning)
    return engine


DISK_EVERY_ITERATION_WARNING_BYTES = 100e6
"""A rank's state above this, flushed to a disk level every iteration, gets a warning at start."""


def every_iteration_warnings(levels: list[Level], state_bytes: int, rank: int,
                             threshold: float = DISK_EVERY_ITERATION_WARNING_BYTES) -> list[str]:
    """A warning per disk level written every iteration when the state is over ``threshold``:
    under ``--async-save``, ``--save-interval 1`` is the host-memory interval and, unless
    ``--ckpt-persistent-interval`` says otherwise, the disk's too."""
    warnings = []
    for lv in levels:
        if lv.name in (L1, L2) and lv.interval == 1 and state_bytes > threshold:
            flag = "--ckpt-local-interval" if lv.name == L1 else "--ckpt-persistent-interval (default: --save-interval)"
            warnings.append(
                f"WARNING: {lv.name} ({lv.root}) is written every iteration: {state_bytes / 1e6:.0f} MB per iteration "
                f"from rank {rank}, which only the disk's speed bounds (older versions are skipped when it cannot keep "
                f"up). Under --async-save, --save-interval is the host-memory (L0) interval; set {flag} to what the "
                "disk should get")
    return warnings
def _replica_partners(cfg, specs: dict[str, ArraySpec], shards: list[tuple[int, int]], group, log):
    """(this rank's partners, its sources' arrays, their shards) for ``--ckpt-peer-replicas``, or
    Nones where the job has one node; collective over ``group``. Nodes are the ranks that share
    the pool directory; fewer nodes than replicas asked for keep fewer, said in a warning."""
    from checkpointing.base import private_files
    from checkpointing.base.agreement import gather_from_all
    from checkpointing.storage.peer_replicas import node_list, replicas_for
    from checkpointing.storage.peers import directory_peers

    directory, _ = private_files.pool_dir(cfg.host_dir)
    node_peers = gather_from_all(group, directory_peers(directory, group))
    k, warning = replicas_for(len(node_list(node_peers)), cfg.peer_replicas, cfg.host_dir)
    if warning:
        log(warning)
    if k == 0:
        return None, None, None
    mine: Partners = partners(node_peers, dist.get_rank(group), k, cfg.host_dir)
    everyone = gather_from_all(group, (specs, shards))
    return mine, {s: everyone[s][0] for s in mine.sources}, {s: everyone[s][1] for s in mine.sources}
