"""The asynchronous multi-level checkpoint engine, training process side (``docs/architecture.md``).

The training process runs no checkpoint thread. It keeps only the entry points, all called on
the training thread:

- ``request(N)`` after optimizer step N: the version's bytes go into an L0 slot (zero-copy: the
  step already wrote them there; copied: a CPU copy now, or CUDA copies enqueued), and the
  version's small state and its flush jobs go to this rank's **flusher process**
  (``checkpointing.engine.flusher``) over a socket. The flusher writes the slot's description (the L0
  commit) and flushes the versions due on L1/L2, skipping any a newer one supersedes.
- ``fence(shard)`` before the optimizer writes a shard: zero-copy, it waits only if a flush of
  the slot being written has not read that shard yet, which it learns from one word of the
  shared control block (``checkpointing.engine.control_block``); copied on CUDA, the training stream
  waits for the shard's copy event.
- ``begin_step``/``end_step`` (zero-copy): which slot the step writes.

The flusher's answers (descriptions written, jobs done) are read without blocking at each
request and step, and while training has to wait (a full pool, a fence): then the engine also
checks that the flusher lives and moves, and raises :class:`FlusherError` naming its exit
status if not (the process, its socket and its liveness: ``checkpointing.engine.flusher_handle``).
Requested versions go to the flusher in request order once their bytes are in their slot
(``checkpointing.engine.landing``). The flush queue's rules are pure functions
(``checkpointing.engine.flush_rules``); test pacing is injected (``checkpointing.engine.pacing``); statistics
live in ``checkpointing.engine.engine_stats``.

A slow disk does not hold the pool: when no slot is free, ``request`` takes the slot of queued
jobs the new version supersedes (same level, not started, not forced) and marks them *orphaned*
in the control block (``checkpointing.engine.slot_claims``); the flusher claims a job under the same
lock and skips an orphaned one, and every rank's flusher agrees on each skip. Only when no slot
can be taken that way does ``request`` wait (backpressure, counted as stall).
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import torch
import torch.distributed as dist

from checkpointing.base import faults
from checkpointing.base.errors import FlusherError
from checkpointing.base.levels import Level
from checkpointing.base.trace import NullTracer
from checkpointing.engine import control_block as cb
from checkpointing.engine import flush_rules, slot_claims
from checkpointing.engine.engine_stats import EngineStats, FlushRecord
from checkpointing.engine.flusher_handle import FlusherHandle, meeting_point
from checkpointing.engine.flusher_template import current_template
from checkpointing.engine.held_versions import HeldVersions
from checkpointing.engine.landing import Landing, PendingVersion
from checkpointing.engine.pacing import training_pacing
from checkpointing.engine.protocol import Abort, Described, Done, FlusherSpec, FlushJob, Stop
from checkpointing.engine.snapshots import CopiedSnapshots
from checkpointing.format.items import CheckpointableState
from checkpointing.storage.host_pool import HostPool, pool_files
from checkpointing.storage.peer_replicas import ReplicaSpec

__all__ = ["CheckpointEngine", "EngineStats", "FlushRecord"]


class CheckpointEngine(HeldVersions):
    """One rank's engine; every rank of the job creates one with the same configuration."""

    def __init__(self, state: CheckpointableState, pool: HostPool, levels: list[Level], group,
                 log: Callable[[str], None] = print, tracer=None, zero_copy: bool = False,
                 flusher_timeout: float = 300.0, replicas: ReplicaSpec | None = None,
                 flusher_start: str = "template"):
        """``zero_copy``: the state's owner writes each step into a pool slot (``begin_step``);
        needs at least two slots (the current version and the one being written).
        ``flusher_timeout``: seconds the flusher may go without a sign of life (a heartbeat; while
        training waits on it, progress) before training stops with an error. ``replicas``: with a
        :data:`~checkpointing.base.levels.PEER` level, whom the flusher sends this rank's versions to
        and whose it holds (their slots are ``pool.replica_slots``). ``flusher_start``: ``template``
        forks the flusher from this process's template where one was started, ``interpreter`` starts one."""
        if zero_copy and len(pool.slots) < 2:
            raise ValueError("zero-copy snapshots need at least 2 host-pool slots (the current version and "
                             "the next); raise --ckpt-host-versions or --ckpt-host-budget-gb")
        if flusher_timeout <= 0:
            raise ValueError(f"--ckpt-flusher-timeout must be > 0 seconds, got {flusher_timeout}")
        self.zero_copy = zero_copy
        self.state = state
        self.tracer = tracer or NullTracer()
        self.pool = pool
        self.levels = levels
        self.group = group
        self.log = log
        self.layout = state.layout
        """The state's layout: the one its L0 snapshots restore into."""
        self.flusher_timeout = flusher_timeout
        self.flusher_start = flusher_start
        self.replicas = replicas
        self.rank = dist.get_rank(group)
        self.stats = EngineStats(stall_by_shard=[0.0] * len(state.shards))
        for note in pool.notes:  # files refused while opening the pool
            log(note)
        for held in pool.replica_slots.values():
            for slot in held:  # a previous run's replicas were used or passed over before the engine started
                slot.invalidate()
        self.slots = [flush_rules.SlotState(i, s.version if s.small_state is not None else None)
                      for i, s in enumerate(pool.slots)]
        self._jobs: dict[int, flush_rules.JobState] = {}
        """Flush jobs sent and not finished (orphaned ones until the flusher has passed them)."""
        self._job_ids = itertools.count(1)
        self._seqs = itertools.count(1)
        self._current: flush_rules.SlotState | None = None
        """Zero-copy: the slot the last step wrote (the state's current version), once there is one."""
        self._target: flush_rules.SlotState | None = None
        """Zero-copy: the slot the running step writes."""
        self._iteration = 0
        self._pacing = training_pacing()
        self._closed = False
        self._last_committed: dict[str, int] = {}
        self.snapshots = None if zero_copy else CopiedSnapshots(
            state.arrays, state.shards, [s.arrays for s in pool.slots], [s.memory for s in pool.slots], self.tracer)
        self._landing = Landing(lambda message: self.flusher.send(message), self.snapshots)
        """Versions whose description the flusher has not confirmed (or, on CUDA, whose copy is
        still in flight)."""
        self.block = cb.ControlBlock(pool.control_path, create=True)
        try:
            self.flusher = self._start_flusher()
        except BaseException:
            self._remove_empty_pool()
            raise

    # -- the flusher process -------------------------------------------------------------------------
    def _start_flusher(self) -> FlusherHandle:
        store, prefix = meeting_point(dist.get_world_size(self.group))
        spec = FlusherSpec(
            rank=self.rank, world_size=dist.get_world_size(self.group), store=store, store_prefix=prefix,
            group_timeout_seconds=max(self.flusher_timeout, 60.0), control_path=self.pool.control_path,
            slot_paths=tuple(s.path for s in self.pool.slots), meta_paths=tuple(s.meta_path for s in self.pool.slots),
            specs=dict(self.pool.specs), shards=tuple(self.state.shards), pieces=tuple(self.state.save_pieces),
            levels=tuple(self.levels), layout=self.layout, trace=not isinstance(self.tracer, NullTracer),
            replicas=self.replicas)
        template = current_template() if self.flusher_start == "template" else None
        return FlusherHandle(spec, self.block, self.flusher_timeout, self.stats, self._handle, self._committed_line,
                             template, pool_files(self.pool))

    def _handle(self, message: Described | Done) -> None:
        """The flusher's answers about this engine's work: a description written, a job done."""
        if isinstance(message, Described):
            error = message.error
            pending = self._landing.described(message.seq)
            slot, version, small_state, requested = pending.slot, pending.version, pending.small_state, pending.requested
            slot.landing = False
            host = self.pool.slots[slot.index]
            if error is None and slot.version == version:
                host.version, host.small_state, host.layout = version, small_state, self.layout
                self.stats.copies += 1
                self.stats.last_copy_seconds = time.perf_counter() - requested
                self.stats.copy_seconds += self.stats.last_copy_seconds
            elif error is not None:
                self.log(f"WARNING: rank {self.rank}: L0 description of iteration {version} failed: {error}; that "
                         "version is not recoverable from host memory, training goes on")
        else:
            record = message.result
            job = self._jobs.pop(message.job_id)
            if not job.released:
                job.released = True
                job.slot.pins -= 1
            if record is None:
                self.stats.skipped[job.level] += 1
            else:
                nbytes, seconds, error = record.nbytes, record.seconds, record.error
                cpu = self.stats.flusher_cpu_since_ready(record.cpu_seconds)
                self.stats.flushes.append(FlushRecord(job.level, job.version, nbytes, seconds, error, cpu))
                if error is None:
                    self._last_committed[job.level] = job.version
                    root = next(lv.root for lv in self.levels if lv.name == job.level)
                    where = f" ({root})" if root else ""  # the peer level has no directory
                    self.log(f"  saved checkpoint at iteration {job.version:7d} to {job.level}{where} in {seconds:.2f} s "
                             f"[{nbytes / 1e6:.1f} MB from this rank]")
                else:
                    root = next(lv.root for lv in self.levels if lv.name == job.level)
                    self.log(f"WARNING: {job.level} flush of iteration {job.version} to {root} failed: {error}; the "
                             "version stays in L0 (host memory), training goes on, the next version will be tried")
            for name, category, start, end, args in message.spans:
                self.tracer.complete_on("ckpt-flusher", name, category, start, end, **args)

    def _committed_line(self) -> str:
        held = sorted(s.version for s in self.pool.slots if s.version is not None and s.small_state is not None)
        done = ", ".join(f"{name} iteration {v}" for name, v in sorted(self._last_committed.items())) or "nothing on disk"
        return (f"last committed by this rank's flusher: {done}; L0 holds {held or 'no version'} in {self.pool.directory}, "
                "kept for the restart (the next run resumes from the newest committed version)")

    def _poll(self) -> None:
        """Read every answer the flusher has sent (no wait)."""
        self.flusher.poll()

    def _wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Wait for ``done()`` on the flusher's answers; raises if it dies or stops moving."""
        self.flusher.wait_until(done, what)

    # -- the training thread -----------------------------------------------------------------------
    def request(self, version: int, force_flush: bool = False, l0_only: bool = False) -> None:
        """Snapshot the state after step ``version``; returns once a slot is claimed.

        ``force_flush`` flushes this version to every level whatever the intervals (the end
        of training); ``l0_only`` flushes it nowhere (a live rollback describes its step again
        with the new branch's small state).
        """
        started_ns = time.perf_counter_ns()
        started = time.perf_counter()
        small_state = self.state.capture_small_state(version)  # small: copied now, on this thread
        self._poll()
        self.flusher.check()
        self._landing.hand_over()
        if self._pacing.holds_request(version):  # the background work catches up first
            self._wait_until(lambda: not self._landing and not self._jobs, "a held request")
        due = [] if l0_only else [level for level in self.levels if force_flush or level.is_due(version)]
        seq = next(self._seqs)
        if self.zero_copy:
            slot = self._current_slot()  # the step already wrote this version there
            handle = None
        else:
            slot = self._claim_slot(due, version)
            self.pool.slots[slot.index].remove_description()  # before the first byte changes
            slot.version = version
            handle = self.snapshots.start(self.state.arrays, self.pool.slots[slot.index].arrays, version)
            self.stats.bytes_copied += sum(a.numel() * a.element_size() for a in self.state.arrays.values())
        host = self.pool.slots[slot.index]
        host.version, host.small_state, host.layout = version, None, None
        slot.version, slot.landing = version, True
        jobs = []
        for level in due:
            job = flush_rules.JobState(next(self._job_ids), level.name, version, slot, forced=force_flush)
            slot.pins += 1
            self._jobs[job.id] = job
            jobs.append(FlushJob(id=job.id, level=level.name, version=version, slot=slot.index, seq=seq,
                                 forced=force_flush))
        self._landing.add(seq, PendingVersion(slot, version, small_state, started, handle, jobs))
        self._landing.hand_over()
        blocked = time.perf_counter() - started
        self.stats.requests += 1
        self.stats.request_seconds += blocked
        self._add_stall(blocked, version)
        for index, iteration, seconds in (self.snapshots.device_waits() if self.snapshots else ()):  # GPU-side waits
            self.stats.stall_by_shard[index] += seconds
            self._add_stall(seconds, iteration)
        self._iteration = version + 1  # fences from now on hold the step of the next iteration
        self.tracer.complete("checkpoint request", "ckpt", started_ns, time.perf_counter_ns(), iteration=version)

    def _claim_slot(self, due: list[Level], version: int) -> flush_rules.SlotState:
        """A slot for a copied version: free, else taken from superseded queued jobs, else wait."""
        levels = {lv.name for lv in due}
        slot = slot_claims.free_or_reclaimed(self.slots, self._jobs, self.block, levels, version)
        if slot is None:
            if slot_claims.usable_once_described(self.slots, self._jobs, levels, version):  # short
                self.stats.description_waits += 1
            else:
                self.stats.backpressure_waits += 1
            found = []
            self._wait_until(lambda: bool(found.append(slot_claims.free_or_reclaimed(
                self.slots, self._jobs, self.block, levels, version)) or found[-1]), "a free host-pool slot")
            slot = found[-1]
        return slot

    def flush_everywhere(self, version: int) -> None:
        """Queue flushes of the already requested ``version`` to the levels its interval skipped
        (the end of training: the final state reaches every level)."""
        seq = self._landing.newest_seq(version)
        slot = next((s for s in self.slots if s.version == version), None)
        if seq is None or slot is None:
            raise ValueError(f"iteration {version} is not the newest version in the host pool; request it first")
        messages = []
        for level in self.levels:
            if not level.is_due(version):
                job = flush_rules.JobState(next(self._job_ids), level.name, version, slot, forced=True)
                slot.pins += 1
                self._jobs[job.id] = job
                messages.append(FlushJob(id=job.id, level=level.name, version=version, slot=slot.index, seq=seq,
                                         forced=True))
        if not self._landing.add_jobs(seq, messages):  # the flusher keeps the newest request's small state
            for message in messages:
                self.flusher.send(message)

    def fence(self, shard_index: int) -> None:
        """Before the optimizer writes shard ``shard_index``: wait for its copy if not done
        (zero-copy: for every flush of the slot being written to have read it)."""
        if self.zero_copy:
            target = self._target
            if target is None or target.pins == 0:  # no flush reads it: no wait, no syscall
                return
            waited = self._wait_flushes_read(target, shard_index)
        else:
            if self._landing:
                self._landing.hand_over()
            waited = self.snapshots.fence(shard_index, self._iteration)
        if waited is None:  # the common case: no clock read
            return
        ended_ns = time.perf_counter_ns()
        self.tracer.complete(f"fence wait shard {shard_index}", "ckpt", ended_ns - int(waited * 1e9), ended_ns)
        self.stats.fence_waits += 1
        self.stats.fence_seconds += waited
        self.stats.stall_by_shard[shard_index] += waited
        self._add_stall(waited, self._iteration)

    def _read_enough(self, target: flush_rules.SlotState, shard_index: int) -> bool:
        """Every unfinished flush of ``target`` has read ``shard_index`` (from the control block)."""
        done = self.block[cb.DONE]
        return all(job.id <= done or self.block.shards_read(job.id) > shard_index
                   for job in self._jobs.values() if job.slot is target and not job.released)

    def _wait_flushes_read(self, target: flush_rules.SlotState, shard_index: int) -> float | None:
        if self._read_enough(target, shard_index):
            return None
        started = time.perf_counter()
        self.block[cb.FENCE_BLOCKED] = target.index + 1  # a held flush of it goes on (GPT_CKPT_HOLD=flush)
        try:
            self._wait_until(lambda: self._read_enough(target, shard_index), f"a flush to read shard {shard_index}")
        finally:
            self.block[cb.FENCE_BLOCKED] = 0
        return time.perf_counter() - started

    # -- zero-copy: the step writes the next version into a slot ------------------------------------
    def begin_step(self) -> dict[str, torch.Tensor] | None:
        """The arrays the next optimizer step writes (zero-copy), or None: the step may update the
        current slot in place, because it holds no version (none was requested since the step
        that wrote it: with ``--save-interval`` > 1 only the step after a request writes out of
        place, the others cost what an in-place step costs).

        Otherwise a slot other than the current version's, preferably one no flush reads (never
        held, else the oldest version); if every other slot is still being flushed, the one
        flushed longest, and the step's fences wait for its flushes shard by shard. Its old
        version leaves L0 now."""
        if not self.zero_copy:
            raise RuntimeError("begin_step is for zero-copy snapshots; this engine copies")
        if self._pacing.holds_step(self._iteration):  # the newest requested version reaches L0 first
            self._wait_until(lambda: not self._landing, "a held step")
        faults.reach("step", self._iteration)  # fault-injection tests kill a rank inside a step here
        self._poll()
        current = self._current
        if current is not None and current.version is None:  # scratch: no version, nothing reads it
            self._target = current
            return None
        target = flush_rules.zero_copy_target(self.slots, current)
        if target is None:  # a description (the L0 commit) of the other slots is being written: short
            found = []
            self._wait_until(lambda: bool(found.append(flush_rules.zero_copy_target(self.slots, current)) or found[-1]),
                             "an L0 description")
            target = found[-1]
        target.version = None
        host = self.pool.slots[target.index]
        host.version = host.small_state = host.layout = None
        host.remove_description()  # before its first byte changes: a crash must not recover it
        self._target = target
        return host.arrays

    def end_step(self) -> None:
        """The step wrote every shard of :meth:`begin_step`'s arrays (or the current slot's, in
        place): they are the current version."""
        self._current, self._target = self._target, None

    def _current_slot(self) -> flush_rules.SlotState:
        """The slot holding the state now. Without a step since the engine started (a request
        right after a load), the state is copied into a free slot first: the one copy zero-copy
        snapshots make."""
        if self._current is None:
            slot = flush_rules.free_slot(self.slots)
            if slot is None:
                self.stats.backpressure_waits += 1
                found = []
                self._wait_until(lambda: bool(found.append(flush_rules.free_slot(self.slots)) or found[-1]),
                                 "a free host-pool slot")
                slot = found[-1]
            host = self.pool.slots[slot.index]
            host.remove_description()
            for name, live in self.state.arrays.items():
                host.arrays[name].copy_(live)
                self.stats.bytes_copied += live.numel() * live.element_size()
            self._current = slot
        return self._current

    def active(self) -> bool:
        """Whether any background work (a description, a flush) is queued or running."""
        self._poll()
        return bool(self._landing or self._jobs)

    def pool_busy(self) -> int:
        """Slots that cannot take a new version now (being described or awaiting a flush)."""
        return sum(1 for s in self.slots if s.pins or s.landing)

    def set_iteration(self, iteration: int) -> None:
        """The training iteration now running: its fence waits are counted as its stall."""
        self._iteration = iteration

    def _add_stall(self, seconds: float, iteration: int) -> None:
        """Stall of training iteration ``iteration``: its fence waits, and the wait of the request
        made after its step."""
        self.stats.stall_seconds += seconds
        self.stats.stall_by_iteration[iteration] = self.stats.stall_by_iteration.get(iteration, 0.0) + seconds

    def flush_progress(self) -> tuple[int, int]:
        """(the flush job running or last run, the shards of its slot it has read): for tests."""
        word = self.block[cb.PROGRESS]
        return word >> cb.PROGRESS_BITS, word & ((1 << cb.PROGRESS_BITS) - 1)

    @property
    def flusher_pid(self) -> int:
        return self.flusher.pid

    # -- shutdown ------------------------------------------------------------------------------------
    def _pending(self) -> list[str]:
        return [f"{j.level} iteration {j.version}" for j in self._jobs.values() if not j.released]

    def wait_idle(self, drain: bool = True) -> float:
        """Wait until every version is in L0 (and, with ``drain``, every queued flush is done),
        with a progress line every 10 s; returns the seconds waited."""
        started = time.perf_counter()
        if self._closed:
            return 0.0
        self.block[cb.DRAINING] = 1  # held flushes (GPT_CKPT_HOLD) go on
        self._poll()
        self._landing.hand_over(wait=True)
        waiting = self._pending() if drain else []
        if waiting:
            self.log(f"> waiting for {len(waiting)} checkpoint flush(es): {', '.join(waiting)} ...")
        last_line = [started]

        def idle() -> bool:
            if time.perf_counter() - last_line[0] >= 10 and self._pending():
                last_line[0] = time.perf_counter()
                self.log(f"  still flushing ({', '.join(self._pending())}), {last_line[0] - started:.0f} s")
            return not self._landing and not (drain and self._jobs)

        self._wait_until(idle, "the queued flushes" if drain else "the L0 descriptions")
        self.block[cb.DRAINING] = 0
        if waiting:
            self.log(f"> checkpoint flushes done in {time.perf_counter() - started:.1f} s")
        return time.perf_counter() - started

    def close(self, drain: bool = True) -> None:
        """Stop the flusher. With ``drain``, finish every queued flush first (normal exit,
        SIGTERM); without, only what the flusher was sent is described, flushes in progress are
        abandoned (uncommitted) (after an error, when peers may be gone and a flush could block
        in a collective)."""
        if self._closed:
            return
        try:
            if drain:
                self.wait_idle(drain=True)
                self.flusher.send(Stop())
                self._wait_until(lambda: self.flusher.cpu_final is not None, "its stop")
            elif not self.flusher.ready:  # still starting: nothing was sent to it, nothing of it to keep
                self.flusher.kill()
            elif self.flusher.running():
                try:  # what was requested gets its L0 description; nothing else is waited for
                    self._landing.hand_over(wait=True)
                    self.flusher.send(Abort())
                except (FlusherError, OSError) as error:  # it died meanwhile: the pool is kept as it is
                    self.log(f"WARNING: rank {self.rank}: {error}")
        finally:
            self._closed = True
            self.flusher.end(timeout=30 if drain else 10)
            if self.snapshots is not None:
                self.snapshots.close()
            if not self.flusher.ready:  # it never started
                self._remove_empty_pool()

    def _remove_empty_pool(self) -> None:
        """Remove the pool if no version reached it (RAM no recovery needs); one that holds a version is kept."""
        files = pool_files(self.pool)
        if files.holds_no_version():
            files.remove()
            self.log(f"> rank {self.rank}: the L0 pool, which held no version, was removed")

