"""A rollback inside the running job: the same processes go back to a version and go on.

Every rank calls :func:`roll_back_live` at the same iteration boundary (the flag that asks for it
rides on the step's own reductions: ``trainer.iteration_signals``). In order, each stage agreed
over the checkpoint layer's gloo group, so every rank takes the same path:

1. **The current state is kept.** The version of the current iteration is put in L0 if it is
   not there, and every queued flush finishes (versions of the branch about to be abandoned are
   committed, then moved aside with the rest: never left as the latest).
2. **Where the step is.** L0 when every rank holds it in host memory, else the fastest disk
   level every rank sees committed (L1, then L2; ``checkpointing.recovery.loading``). A step no level
   holds is refused, naming the nearest held steps; nothing has changed, training goes on.
3. **Check, then move.** Each level's coordinator (a node's first rank for L1, rank 0 for L2)
   plans its moves (``checkpointing.recovery.rollback.plan``); a refusal anywhere (a branch name taken)
   is raised everywhere before anything moves.
4. **Read from disk first.** A step only on disk is read with the ordinary reader, checksums
   verified, into arrays that are not the current version's slot; a read that fails puts the
   current version back from L0 and is refused, with nothing changed.
5. **Record, move aside, restore.** Rank 0 appends the rollback to ``rollbacks.jsonl``: the
   commit point (a later resume never loads a version of the abandoned branch from any level,
   own or peer memory included, moved aside yet or not). Later versions on every level then go
   to ``branches/<name>/``; a step in L0 becomes the state (zero-copy: the slot is adopted, no
   byte copied; copied: the slot is copied into the live arrays); the engine drops its later L0
   slots. Every path ends in the one re-sync of every load (``after_load``): weights, optimizer,
   step counts, RNG.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from checkpointing.base import faults
from checkpointing.base.agreement import common_to_all, gather_from_all
from checkpointing.base.errors import CheckpointError
from checkpointing.base.levels import L0, L1, L2
from checkpointing.format import keys
from checkpointing.format.items import LoadedParts
from checkpointing.recovery.loading import CheckpointLoader
from checkpointing.recovery.rollback import ROLLBACK_RECORD, RollbackRefused, apply, nearest, plan


class LiveRollbackRefused(RollbackRefused):
    """Raised on every rank alike: the job did not roll back and goes on where it was."""


@dataclass(frozen=True)
class LiveRollbackDone:
    """What a live rollback did (the same on every rank)."""

    step: int
    from_iteration: int
    source: str
    """``L0``, ``L1`` or ``L2``: where the state came from."""
    seconds: float
    """From the call to the restored state, moves and record included."""
    drain_seconds: float
    """Of which waiting for queued flushes of the abandoned branch."""
    branch: str
    moved: int
    """Checkpoint directories moved aside, on every level and node."""
    notes: tuple[str, ...] = ()


def held_steps(manager) -> tuple[set[int], dict[str, set[int]]]:
    """(the versions every rank holds in L0, {disk level: versions every rank sees committed there
    and may load}); collective over the manager's group."""
    engine = manager.engine
    in_l0 = common_to_all(manager.group, engine.held_versions()) if engine is not None else set()
    on_disk: dict[str, set[int]] = {L1: set(), L2: set()}
    for level, checkpoint in _loader(manager, None).candidates():
        on_disk[level].add(checkpoint.iteration)
    return in_l0, on_disk


def roll_back_live(manager, step: int, current: int, branch: str) -> LiveRollbackDone:
    """Roll the running job back from iteration ``current`` to ``step`` (see the module's
    docstring); every rank calls it. Raises :class:`LiveRollbackRefused` (on every rank) when it
    cannot, with nothing changed."""
    started = time.perf_counter()
    engine = manager.engine
    if engine is None:
        raise LiveRollbackRefused("a live rollback needs --async-save: the versions it goes back to are the engine's")
    if step > current:
        raise LiveRollbackRefused(f"iteration {step} is ahead of the job (at iteration {current})")
    # 1. The current state is kept, and no flush is in flight.
    if manager.last_saved != current:  # not requested at its step (--save-interval)
        engine.request(current)
    engine.wait_idle(drain=True)
    drained = time.perf_counter() - started
    # 2. Where the step is.
    in_l0, on_disk = held_steps(manager)
    source = L0 if step in in_l0 else L1 if step in on_disk[L1] else L2 if step in on_disk[L2] else None
    if source is None:
        everywhere = sorted(in_l0 | on_disk[L1] | on_disk[L2])
        raise LiveRollbackRefused(f"no level holds iteration {step} on every rank; nearest held: "
                                  f"{nearest(everywhere, step)}")
    # 3. Check every move before any is made.
    actions, refusal = [], None
    try:
        actions = plan(step, manager.cfg.save, None, branch, host_dir=None, levels=_levels_moved_here(manager),
                       held_in_memory=(step,), record=manager.rank == 0)
    except (RollbackRefused, OSError) as error:
        refusal = f"rank {manager.rank}: {error}"
    refusals = [r for r in gather_from_all(manager.group, refusal) if r]
    if refusals:
        raise LiveRollbackRefused("; ".join(refusals))
    # 4. A version read from disk is read before anything is committed: a failed read leaves
    #    the job where it was.
    notes: tuple[str, ...] = ()
    if source != L0:
        notes = _restore_from_disk(manager, step, current, source)
    # 5. The record is the rollback's commit point: from here a restart resumes on the new
    #    branch (the loader passes over versions of the abandoned one on every level, moved yet or not).
    apply([(d, (*a, {"live": True, "from": current})) for d, a in actions if a[0] == "record"])  # rank 0
    gather_from_all(manager.group, None)
    faults.reach("rollback", step)  # fault-injection tests kill a rank here
    errors = None
    try:
        apply([a for a in actions if a[1][0] != "record"])
    except OSError as error:
        errors = f"rank {manager.rank}: {error}"
    failed = [e for e in gather_from_all(manager.group, errors) if e]
    if failed:  # the rollback stands (recorded); what did not move is named, nothing was deleted
        notes += (f"moving the abandoned versions aside failed ({'; '.join(failed)}): they are not loaded (see "
                  f"{ROLLBACK_RECORD}); move them by hand (scripts/rollback.sh --list shows them)",)
    if source == L0:
        notes += _after_l0(manager, step, engine.restore_live(step))
    engine.drop_after(step)
    engine.set_iteration(step + 1)
    if manager.last_saved is not None and manager.last_saved > step:
        manager.last_saved = None
    manager.loaded = step
    moved = sum(gather_from_all(manager.group, sum(1 for _, a in actions if a[0] == "move")))
    return LiveRollbackDone(step, current, source, time.perf_counter() - started, drained, branch, moved, notes)


def _levels_moved_here(manager) -> list[tuple[str, str]]:
    """The levels this rank moves: its node's L1 on the node's first rank, L2 on rank 0."""
    levels = []
    cfg = manager.cfg
    if cfg.local_dir and manager.rank == min(manager.local_peers or [manager.rank]):
        levels.append((L1, cfg.local_dir))
    if cfg.save and manager.rank == 0:
        levels.append((L2, cfg.save))
    return levels


def _loader(manager, step: int | None) -> CheckpointLoader:
    """The ordinary loader over the job's own levels (``--save`` is read as L2), for ``step``."""
    cfg = dataclasses.replace(manager.cfg, load=manager.cfg.save, ckpt_step=step, finetune=False,
                              load_optim=True, load_rng=True)
    return CheckpointLoader(cfg, manager.state, manager.group, manager.log)


def _restore_from_disk(manager, step: int, current: int, source: str) -> tuple[str, ...]:
    """Read ``step`` from ``source`` with the ordinary loader, into arrays that are not the current
    version's slot. A failed read puts ``current`` back from L0 and raises
    :class:`LiveRollbackRefused`."""
    engine = manager.engine
    engine.detach_for_read()
    try:
        loaded, _ = _loader(manager, step).load()
    except CheckpointError as error:
        _after_l0(manager, current, engine.restore_live(current))
        raise LiveRollbackRefused(f"reading iteration {step} from {source} failed ({error}); the job goes on from "
                                  f"iteration {current}, nothing was moved") from None
    if loaded != step:  # the loader reads only --ckpt-step's candidates; a guard, not a path
        raise CheckpointError(f"live rollback to {step} loaded iteration {loaded}")
    return ()


def _after_l0(manager, version: int, held: dict) -> tuple[str, ...]:
    """The re-sync after an L0 restore: ``common`` from rank 0, this rank's RNG states."""
    common = gather_from_all(manager.group, held.get(keys.COMMON))[0]  # rank 0 captured it
    small_state = {keys.COMMON: common, **{k: v for k, v in held.items() if keys.is_rng_key(k)}}
    notes = manager.state.after_load(small_state, LoadedParts(version, L0, weights_in_arrays=True, optimizer=True,
                                                              rng=True, resume=True))
    return tuple(notes)
