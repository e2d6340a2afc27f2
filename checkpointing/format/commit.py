"""The save protocol of one level: data files, then metadata (the commit), then the tracker.

1. The coordinator moves an existing ``iter_N`` aside (nothing is written over or deleted).
2. Every rank writes and fsyncs its file and the directory.
3. Every rank learns whether every rank's file is durable (a small all-gather of errors).
4. The chunk records (after a level's first version, only their checksums:
   ``checkpointing.format.save_plan``) are gathered to the coordinator alone, which checks they tile
   every tensor, writes the metadata to a temporary name, fsyncs and renames it: the
   checkpoint is committed. On a node-local level each node's first rank is the coordinator of
   its directory and gathers its node's ranks only, over the node's group: its ``.metadata``
   describes that node's files, and what a node's coordinator does per version does not grow
   with the job.
5. Only then does the tracker move; then retention removes old committed checkpoints.

Every rank learns every outcome, so a failure on one rank raises the same error on all of them
and never leaves a partial checkpoint looking committed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from checkpointing.base import faults
from checkpointing.base.agreement import errors_from_all, gather_from_all
from checkpointing.base.durable import TRACKER_NAME, CheckpointWriteError, read_tracker, write_tracker
from checkpointing.base.levels import Level
from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.base.trace import NullTracer
from checkpointing.format.discovery import iteration_dir, list_checkpoints
from checkpointing.format.items import TensorPiece
from checkpointing.format.metadata import ITER_DIR, METADATA_NAME, build_metadata, write_metadata
from checkpointing.format.save_plan import SavePlan, SavePlanChangedError
from checkpointing.format.writer import RankFileWrite, data_file_name, write_rank_file_version


@dataclass(frozen=True)
class SaveResult:
    iteration: int
    path: str
    bytes_written: int
    """This rank's bytes."""
    seconds: float


def _gather_to_coordinator(sent: Any, group, peers: list[int], node_group) -> list | None:
    """Every rank's ``sent`` of ``peers`` in their order, on ``peers[0]`` (None on the others):
    over ``node_group`` when the level is node-local and there is one, else over ``group``."""
    coordinator = dist.get_rank(group) == peers[0]
    shared = len(peers) == dist.get_world_size(group)
    if shared and len(peers) == 1:  # a group of one: its own payload, not a round trip through pickle
        return [sent]
    if shared or node_group is not None:  # peers[0] is rank 0 of either group
        out = [None] * len(peers) if coordinator else None
        dist.gather_object(sent, out, group=group if shared else node_group, group_dst=0)
        return out
    everyone = gather_from_all(group, sent)
    return [everyone[r] for r in peers] if coordinator else None


def _raise_if_failed(outcomes: list, what: str, partial: str | None = None, before_commit: bool = True) -> None:
    """Raise :class:`CheckpointWriteError` on every rank if any rank's outcome is an error
    (a string). ``partial``: the uncommitted directory this rank created, removed first, so a full
    disk gets its space back and the next version is tried on a clean level."""
    errors = [f"rank {r}: {e}" for r, e in enumerate(outcomes) if isinstance(e, str)]
    if errors:
        said = ", nothing was committed" if before_commit else " at its commit"  # the coordinator's error says how far it got
        raise CheckpointWriteError(None, f"{what} failed{said}: " + "; ".join(errors)
                                   + (_remove_partial(partial) if partial else ""))


def _remove_partial(directory: str) -> str:
    """Remove the ``iter_N`` this save created and could not commit; returns what to add to the
    message. Its ``.metadata`` may be there (renamed into place, then the directory's fsync
    failed): it goes first, so a crash midway leaves an uncommitted directory, never a committed
    partial one."""
    failures: list[str] = []
    try:
        os.unlink(os.path.join(directory, METADATA_NAME))
    except FileNotFoundError:
        pass
    except OSError as error:
        return f" (its directory {directory} could not be un-committed: {error}; remove it by hand)"
    shutil.rmtree(directory, onerror=lambda _f, path, info: failures.append(f"{path}: {info[1]}"))
    if failures:
        return f" (its partial directory {directory} could not be removed: {failures[0]}; remove it by hand)"
    root = os.path.dirname(directory)
    try:  # the tracker was renamed into place, then the directory's fsync failed: back to the previous version
        if read_tracker(root) == int(ITER_DIR.match(os.path.basename(directory)).group(1)):
            committed = [c.iteration for c in list_checkpoints(root) if c.committed]
            if committed:
                write_tracker(root, committed[-1])
            else:
                os.unlink(os.path.join(root, TRACKER_NAME))
    except (OSError, ValueError) as error:
        return f" (its partial directory {directory} was removed, but its tracker could not be restored: {error})"
    return f" (its partial directory {directory} was removed)"


def save_and_commit(
    level: Level,
    iteration: int,
    arrays: dict[str, torch.Tensor],
    pieces: list[TensorPiece],
    small_state: dict[str, Any],
    layout: ParallelLayout | dict[str, Any],
    group,
    *,
    tracer=None,
    progress: Callable[[int], None] | None = None,
    progress_points: Sequence[bool] | None = None,
    plan: SavePlan | None = None,
    node_group=None,
) -> SaveResult:
    """Collectively save one version to ``level.root`` (every rank of ``group`` calls it).

    ``level.name`` names the fault points on the way (``L2.write``, ``sync.metadata``, ...);
    ``level.retain_last`` committed checkpoints are kept.

    ``level.peers``: the ranks whose ``root`` is the same directory as this rank's (see
    :func:`checkpointing.storage.peers.directory_peers`); None: every rank's. When ``root`` is
    node-local (peers are not everyone), each node's first rank coordinates its directory, every
    rank also writes its replica pieces (so a node restores its ranks from its own disk), and
    each node's metadata describes its own ranks' chunks and names the files it holds. The
    commit stays global: no node writes its metadata before every rank of the job has its file
    durable. ``node_group``: the process group of ``level.peers`` (the flusher makes one per
    node), over which a node-local level's records are gathered; None: they are gathered over
    ``group`` and the node's taken (one-off callers).

    ``level.write_rate``: this rank writes its data file at most this many bytes per second.
    ``progress(i)``: this rank's pieces ``0..i`` are written, called after the pieces that
    ``progress_points`` marks (every piece when None) and at the end (``write_rank_file``).

    ``plan``: this level's :class:`checkpointing.format.save_plan.SavePlan` (the same object at every
    version of an engine, one per level): after its first committed version each rank gathers
    only its checksums and the coordinator fills the metadata it built then. None: the metadata
    is built from every rank's full records (one-off writers)."""
    started = time.perf_counter()
    root, retain_last, write_rate = level.root, level.retain_last, level.write_rate
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    peers = sorted(level.peers) if level.peers is not None else list(range(world))
    node_local = len(peers) < world
    coordinator = rank == peers[0]
    directory = iteration_dir(root, iteration)
    error = None
    if coordinator:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(directory):
                os.rename(directory, f"{directory}.superseded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.makedirs(directory)
        except OSError as e:
            error = f"cannot create {directory}: {e.strerror or e}"
    _raise_if_failed(errors_from_all(group, error), f"saving iteration {iteration} to {root}")

    tracer = tracer or NullTracer()
    written: RankFileWrite | str
    try:
        faults.reach(f"{level.name}.write", iteration)
        with tracer.span(f"write {level.name}", "ckpt", iteration=iteration):
            written = write_rank_file_version(directory, dist.get_rank(), arrays, pieces, small_state,
                                              replicas=node_local, write_rate=write_rate, progress=progress,
                                              layouts=plan.rank.file_layouts if plan is not None else None,
                                              progress_points=progress_points)
    except OSError as e:  # CheckpointWriteError names the file; anything else is reported as is
        written = str(e)
    sent: Any = written
    if not isinstance(written, str):
        try:
            sent = plan.rank.payload_of(written) if plan is not None else written.records()
        except SavePlanChangedError as e:  # every rank must hear of it, or they would wait for this one
            sent = f"{type(e).__name__}: {e}"
    partial = directory if coordinator else None
    _raise_if_failed(errors_from_all(group, sent if isinstance(sent, str) else None),
                     f"saving iteration {iteration} to {directory}", partial)
    gathered = _gather_to_coordinator(sent, group, peers, node_group)

    error = None
    committed = False
    if coordinator:
        try:
            commit_started = time.perf_counter_ns()
            local_files = [data_file_name(r) for r in peers] if node_local else None
            if plan is not None:
                metadata = plan.metadata(gathered, iteration, layout, local_files)
            else:
                metadata = build_metadata([r for rs in gathered for r in rs], iteration, layout, local_files)
            faults.reach(f"{level.name}.metadata", iteration)
            write_metadata(directory, metadata)
            faults.reach(f"{level.name}.tracker", iteration)
            write_tracker(root, iteration)
            committed = True  # a failure before here un-commits the version: all of a save, or none of it
            tracer.complete(f"commit {level.name}", "ckpt", commit_started, time.perf_counter_ns(), iteration=iteration)
            if retain_last:
                apply_retention(root, retain_last)
        except (OSError, ValueError) as e:
            error = (f"{directory} is committed, but then: {e}" if committed
                     else f"committing {directory}: {e}; nothing was committed")
    _raise_if_failed(errors_from_all(group, error), f"saving iteration {iteration}",
                     partial if not committed else None, before_commit=False)
    if plan is not None:
        plan.committed()
    return SaveResult(iteration, directory, written.nbytes, time.perf_counter() - started)


def apply_retention(root: str, keep: int) -> list[str]:
    """Remove committed checkpoints older than the newest ``keep`` committed ones, and what can no
    longer be of use below the oldest one kept: uncommitted ``iter_N`` (a crashed save, which no
    run completes) and ``iter_N.superseded-*`` copies (moved aside when ``iter_N`` was saved again).

    A checkpoint is un-committed first (its metadata removed), then its files deleted, so a
    crash in between leaves an uncommitted directory, never a committed partial one. Only a
    level with retention (``--save-retain-last``, ``--ckpt-local-retain-last``) deletes anything.
    """
    stored = list_checkpoints(root)
    committed = [c for c in stored if c.committed]
    removed = []
    for c in committed[:-keep] if keep > 0 else []:
        os.unlink(os.path.join(c.path, METADATA_NAME))
        shutil.rmtree(c.path)
        removed.append(c.path)
    kept = committed[-keep:] if keep > 0 else committed
    if kept:
        oldest = kept[0].iteration
        stale = [c.path for c in stored if not c.committed and c.iteration < oldest]
        for entry in os.scandir(root):
            match = _SUPERSEDED.match(entry.name)
            if match and int(match.group(1)) < oldest and entry.is_dir(follow_symlinks=False):
                stale.append(entry.path)
        for path in sorted(stale):
            shutil.rmtree(path)
            removed.append(path)
    return removed


_SUPERSEDED = re.compile(r"^iter_(\d{7})\.superseded-")
