"""The asynchronous multi-level checkpoint engine (DESIGN.md, "The checkpoint engine").

``request(N)``, called after optimizer step N, returns at once: a copy thread copies every
shard of the state's flat arrays into a free slot of the host pool (L0) while forward and
backward of N+1 run (they only read those arrays). The optimizer step of N+1 calls
``fence(shard)`` before it updates a shard, and waits only if that shard's copy is not done.
How a shard is copied and fenced depends on the device (``checkpointing.shard_copy``: threads
on CPU, a CUDA stream and events on GPU); a landing thread waits for each version's bytes and
then describes its slot, the L0 commit.
A flush thread then writes selected versions to L1 (node-local) and L2 (``--save``) with the
format's commit protocol; a version that a newer one supersedes before its flush starts is
skipped. Time waited in fences and for a free slot is the **stall**.

The flush thread runs collectives on a group of its own. Its job list is decided on the main
thread, identically on every rank; whether to skip a job is agreed by one small all-reduce, so
every rank flushes the same versions. A slow disk therefore does not hold the pool: when no
slot is free, ``request`` takes the slot of a queued job that the new version supersedes (same
level, not started, not forced) and marks the job *orphaned*; the job stays in the queue, so
every rank still sees the same sequence, and the agreement skips it everywhere. Only when no
slot can be taken that way (every slot being flushed, copied, or held for a version a level
needs) does ``request`` wait (backpressure).
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from checkpointing import faults
from checkpointing.commit import save_and_commit
from checkpointing.durable import CheckpointWriteError
from checkpointing.host_pool import ArraySpec, HostPool, HostSlot, job_tag
from checkpointing.items import CheckpointableState
from checkpointing.levels import Level
from checkpointing.shard_copy import copier_for
from checkpointing.trace import NullTracer


def _named(loop: Callable[[], None]) -> Callable[[], None]:
    """``loop`` under its Python thread's name also in the OS (``top -H``, ``/proc/<pid>/task``),
    so the CPU each engine thread takes can be told apart from training's."""

    def run() -> None:
        name = threading.current_thread().name.encode()[:15]
        try:
            ctypes.CDLL(None).pthread_setname_np(ctypes.c_void_p(threading.get_ident()), name)
        except (AttributeError, OSError):
            pass  # no pthread_setname_np here: the name is cosmetic
        loop()

    return run


@dataclass
class FlushRecord:
    level: str
    version: int
    bytes: int
    seconds: float
    error: str | None = None


@dataclass
class EngineStats:
    """What the engine did; the trainer reports it (TensorBoard, end-of-run summary)."""

    stall_seconds: float = 0.0
    stall_by_iteration: dict[int, float] = field(default_factory=dict)
    stall_by_shard: list[float] = field(default_factory=list)
    fence_waits: int = 0
    backpressure_waits: int = 0
    copies: int = 0
    requests: int = 0
    request_seconds: float = 0.0
    """Wall time the training thread spent inside ``request`` (capture of the small state, slot
    claim, backpressure waits included)."""
    copy_seconds: float = 0.0
    last_copy_seconds: float = 0.0
    flushes: list[FlushRecord] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))


@dataclass
class _Job:
    level: Level
    version: int
    slot: HostSlot
    forced: bool = False
    """A forced flush (end of training): never superseded."""
    claimed: bool = False
    """The flush thread has taken it (its skip decision is being agreed, or it is written)."""
    orphaned: bool = False
    """Superseded, and its slot taken by a newer version: every rank will skip it."""
    released: bool = False
    """Its pin on ``slot`` is given back."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot.pins -= 1


class CheckpointEngine:
    """One rank's engine; every rank of the job creates one with the same configuration."""

    def __init__(self, state: CheckpointableState, pool: HostPool, levels: list[Level], group,
                 log: Callable[[str], None] = print, layout: dict | None = None, tracer=None):
        self.state = state
        self.tracer = tracer or NullTracer()
        self.pool = pool
        self.levels = levels
        self.group = group
        self.log = log
        self.layout = layout or {}
        self.stats = EngineStats(stall_by_shard=[0.0] * len(state.shards))
        for note in pool.notes:  # files refused while opening the pool
            log(note)
        self.copy_hook: Callable[[int], None] | None = None
        """Test hook: called by the copy thread before it copies shard ``i``."""
        self.flush_hook: Callable[[Level, int], None] | None = None
        """Test hook: called by the flush thread before it writes a version."""
        self._lock = threading.Condition()
        self._copy_queue: collections.deque = collections.deque()
        self._flush_queue: collections.deque[_Job] = collections.deque()
        self._landing: set[HostSlot] = set()
        """Slots whose copy is not complete in host memory yet (not reusable, not flushable)."""
        self._land_queue: collections.deque = collections.deque()
        self.copier = copier_for(state.arrays, len(state.shards))
        for slot in pool.slots:
            self.copier.register(slot.memory)
        self._issuing = False
        """The copy thread has not yet started every shard's copy of the newest request."""
        self._flushing = False
        self._closed = False
        self._iteration = 0
        self._requested = -1
        """The newest version queued for copying."""
        self._copy_released = -1
        """Under a ``GPT_CKPT_HOLD`` of ``copy`` (``checkpointing.faults``): versions up to this one
        may be copied."""
        # Read once: unset (every real run), the request path pays one attribute test for them.
        self._hold_copies = faults.holds("copy")
        self._hold_requests = faults.holds("request")
        if self._hold_copies:
            self.copier.on_block = self._release_copies
        self._threads = [threading.Thread(target=_named(loop), name=name, daemon=True) for loop, name in
                         ((self._copy_loop, "ckpt-copy"), (self._land_loop, "ckpt-land"), (self._flush_loop, "ckpt-flush"))]
        for t in self._threads:
            t.start()

    @classmethod
    def for_config(cls, cfg, state: CheckpointableState, group, log, rank: int, layout: dict,
                   tracer=None, local_peers: list[int] | None = None) -> "CheckpointEngine":
        """``local_peers``: the ranks sharing this rank's ``--ckpt-local-dir`` (its node)."""
        specs = {name: ArraySpec(a.numel(), a.dtype) for name, a in state.arrays.items()}
        budget = int(cfg.host_budget_gb * 2**30) if cfg.host_budget_gb else None
        pool = HostPool(job_tag(cfg.save), rank, specs, cfg.host_versions, budget, cfg.host_dir)
        rate = cfg.write_rate_limit_mb * 1e6 if cfg.write_rate_limit_mb else None
        levels = []
        if cfg.local_dir:
            levels.append(Level("L1", cfg.local_dir, cfg.local_interval, cfg.local_retain_last, local_peers, rate))
        levels.append(Level("L2", cfg.save, cfg.l2_interval, cfg.save_retain_last, None, rate))
        log(f"> async checkpointing: L0 {len(pool.slots)} versions in shared memory ({pool.bytes / 2**30:.2f} GiB "
            f"per rank); " + "; ".join(f"{lv.name} {lv.root} every {lv.interval}" for lv in levels)
            + (f"; writes at most {cfg.write_rate_limit_mb:g} MB/s per rank" if rate else ""))
        return cls(state, pool, levels, group, log, layout, tracer)

    # -- the training thread -----------------------------------------------------------------------
    def request(self, version: int, force_flush: bool = False) -> None:
        """Snapshot the state after step ``version``; returns once a slot is claimed.

        ``force_flush`` flushes this version to every level whatever the intervals (the end
        of training).
        """
        started_ns = time.perf_counter_ns()
        started = time.perf_counter()
        objects = self.state.capture_objects(version)  # small: copied now, on this thread
        with self._lock:
            if self._hold_copies:
                self._release_copies_locked()  # a held copy goes on: this request waits for it
            if self._hold_requests and faults.holds("request", version):  # the background work catches up first
                while self._issuing or self._landing or self._flush_queue:
                    self._lock.wait()
            self._wait_issued_locked()  # the previous copy started everywhere (its fences passed already)
            due = [level for level in self.levels if force_flush or level.is_due(version)]
            slot = self._free_slot_locked() or self._reclaim_locked(due, version)
            if slot is None:
                self.stats.backpressure_waits += 1
                while slot is None:
                    self._lock.wait()
                    slot = self._free_slot_locked() or self._reclaim_locked(due, version)
            # What it will hold; described (recoverable) once copied. Its old description is
            # removed by the copy thread before the copy starts.
            slot.version, slot.objects, slot.layout = version, None, None
            self.copier.begin()
            self._landing.add(slot)
            self._issuing = True
            self._requested = version
            self._copy_queue.append((slot, version, objects))
            for level in due:
                slot.pins += 1
                self._flush_queue.append(_Job(level, version, slot, forced=force_flush))
            self._lock.notify_all()
        blocked = time.perf_counter() - started
        self.stats.requests += 1
        self.stats.request_seconds += blocked
        self._add_stall(blocked, version)
        for index, iteration, seconds in self.copier.device_waits():  # GPU-side fence waits, measured now
            self.stats.stall_by_shard[index] += seconds
            self._add_stall(seconds, iteration)
        self._iteration = version + 1  # fences from now on hold the step of the next iteration
        self.tracer.complete("checkpoint request", "ckpt", started_ns, time.perf_counter_ns(), iteration=version)

    def flush_everywhere(self, version: int) -> None:
        """Queue flushes of the already requested ``version`` to the levels its interval skipped
        (the end of training: the final state reaches every level)."""
        with self._lock:
            slot = next((s for s in self.pool.slots if s.version == version), None)
            if slot is None:
                raise ValueError(f"iteration {version} is not in the host pool; request it first")
            for level in self.levels:
                if not level.is_due(version):
                    slot.pins += 1
                    self._flush_queue.append(_Job(level, version, slot, forced=True))
            self._lock.notify_all()

    # -- what L0 holds (the checkpoint manager's view of the pool) ---------------------------------
    def held_versions(self, layout: dict) -> list[int]:
        """Versions this rank holds in L0, committed (copied and described) in ``layout``; a
        previous run's snapshots that survived in shared memory are among them."""
        with self._lock:
            return sorted(s.version for s in self.pool.slots
                          if s.version is not None and s.objects is not None and s.layout == layout)

    def restore(self, version: int) -> dict:
        """Copy L0 ``version`` into the state's live arrays; returns its small objects (the
        ``common`` item is in rank 0's only). Call before training starts."""
        with self._lock:
            slot = next((s for s in self.pool.slots if s.version == version and s.objects is not None), None)
            if slot is None:
                raise ValueError(f"iteration {version} is not held in L0 on this rank")
            for name, live in self.state.arrays.items():
                live.copy_(slot.arrays[name])
            return dict(slot.objects)

    def keep_only(self, version: int | None) -> None:
        """Forget every L0 version but ``version`` (after a load: older runs' snapshots are stale,
        and a fine-tuning run's versions restart from 0)."""
        with self._lock:
            for s in self.pool.slots:
                if s.version != version and s.pins == 0 and s not in self._landing:
                    s.invalidate()

    def fence(self, shard_index: int) -> None:
        """Before the optimizer writes shard ``shard_index``: wait for its copy if not done."""
        waited = self.copier.fence(shard_index, self._iteration)
        if waited is None:  # the common case: no clock read, no lock
            return
        ended_ns = time.perf_counter_ns()
        self.tracer.complete(f"fence wait shard {shard_index}", "ckpt", ended_ns - int(waited * 1e9), ended_ns)
        self.stats.fence_waits += 1
        self.stats.stall_by_shard[shard_index] += waited
        self._add_stall(waited, self._iteration)

    def pool_busy(self) -> int:
        """Slots that cannot take a new version now (being copied or awaiting a flush)."""
        with self._lock:
            return sum(1 for s in self.pool.slots if s.pins or s in self._landing)

    def set_iteration(self, iteration: int) -> None:
        """The training iteration now running: its fence waits are counted as its stall."""
        self._iteration = iteration

    def _add_stall(self, seconds: float, iteration: int) -> None:
        """Stall of training iteration ``iteration``: its fence waits, and the wait of the request
        made after its step."""
        self.stats.stall_seconds += seconds
        self.stats.stall_by_iteration[iteration] = self.stats.stall_by_iteration.get(iteration, 0.0) + seconds

    def _free_slot_locked(self) -> HostSlot | None:
        """An unpinned slot that is not being copied: never held, else the oldest version."""
        free = [s for s in self.pool.slots if s.pins == 0 and s not in self._landing]
        if not free:
            return None
        return min(free, key=lambda s: -1 if s.version is None else s.version)

    def _reclaim_locked(self, due: list[Level], version: int) -> HostSlot | None:
        """The oldest slot held only by queued flush jobs that ``version`` supersedes (a level in
        ``due``, an older version, not started, not forced); those jobs are orphaned."""
        jobs_of = collections.defaultdict(list)
        for job in self._flush_queue:
            if not job.released:
                jobs_of[job.slot].append(job)
        for slot in sorted(jobs_of, key=lambda s: s.version):
            jobs = jobs_of[slot]
            if slot in self._landing or len(jobs) != slot.pins:
                continue
            if all(j.level in due and j.version < version and not (j.claimed or j.forced) for j in jobs):
                for job in jobs:
                    job.orphaned = True
                    job.release()
                return slot
        return None

    def _release_copies(self) -> None:
        """A fence is about to wait (the copier calls it), or training waits for the copies: a copy
        held by ``GPT_CKPT_HOLD=copy`` goes on."""
        with self._lock:
            self._release_copies_locked()

    def _release_copies_locked(self) -> None:
        if self._copy_released < self._requested:
            self._copy_released = self._requested
            self._lock.notify_all()

    def _wait_issued_locked(self) -> None:
        while self._issuing:
            self._lock.wait()

    def _next(self, queue: collections.deque):
        """The next item of a background thread's ``queue``, waiting for one; None once the
        engine is closed and the queue is empty (the thread ends)."""
        with self._lock:
            while not queue and not self._closed:
                self._lock.wait()
            return queue.popleft() if queue else None

    # -- copy thread -------------------------------------------------------------------------------
    def _copy_loop(self) -> None:
        """Start every shard's copy of each requested version, in order (on CPU: copy it)."""
        while (job := self._next(self._copy_queue)) is not None:
            slot, version, objects = job
            started = time.perf_counter()
            slot.remove_description()  # its old version is gone from now on, also for a restart after a crash
            faults.reach("copy", version)
            if self._hold_copies and faults.holds("copy", version):
                with self._lock:  # until the next step blocks in a fence (or training waits for it)
                    while self._copy_released < version:
                        self._lock.wait()
            delay = faults.delay("copy")
            for index, (lo, hi) in enumerate(self.state.shards):
                if self.copy_hook is not None:
                    self.copy_hook(index)
                if delay:
                    time.sleep(delay)
                shard_started = time.perf_counter_ns()
                self.copier.copy(index, [(slot.arrays[name][lo:hi], live[lo:hi]) for name, live in self.state.arrays.items()])
                self.tracer.complete(f"copy shard {index}", "ckpt", shard_started, time.perf_counter_ns(), iteration=version)
            landed = self.copier.all_started()
            with self._lock:
                self._issuing = False  # the next request may go on (on a GPU, before these bytes land)
                self._land_queue.append((slot, version, objects, started, landed))
                self._lock.notify_all()

    def _land_loop(self) -> None:
        """Wait until each version's bytes are in host memory, then describe its slot (the L0
        commit) and let flushes read it. A thread of its own, so that on a GPU the next version's
        copies are started while this one is still in flight."""
        while (job := self._next(self._land_queue)) is not None:
            slot, version, objects, started, landed = job
            self.copier.wait_landed(landed)
            slot.describe(version, objects, self.layout)
            with self._lock:
                self.stats.copies += 1
                self.stats.last_copy_seconds = time.perf_counter() - started
                self.stats.copy_seconds += self.stats.last_copy_seconds
                self._landing.discard(slot)
                self._lock.notify_all()

    # -- flush thread ------------------------------------------------------------------------------
    def _flush_loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # training first
        except OSError:
            pass  # not permitted here: run at normal priority
        while True:
            with self._lock:
                while not self._flush_queue and not self._closed:
                    self._lock.wait()
                if not self._flush_queue:
                    return
                job = self._flush_queue[0]
                self._flushing = True
                while not job.orphaned and job.slot in self._landing:  # its copy is still running
                    self._lock.wait()
                job.claimed = True  # from here on, request() cannot orphan it
                superseded = job.orphaned or not job.forced and any(
                    j.level is job.level and j.version > job.version for j in list(self._flush_queue)[1:])
            # Every rank must agree: skip if any rank already sees a newer version for this level
            # (or took this version's slot for a newer one).
            flag = torch.tensor([1 if superseded else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item():
                self.stats.skipped[job.level.name] += 1
            else:
                self._flush(job)
            with self._lock:
                self._flush_queue.popleft()
                job.release()
                self._flushing = False
                self._lock.notify_all()

    def _flush(self, job: _Job) -> None:
        level, slot = job.level, job.slot
        if self.flush_hook is not None:
            self.flush_hook(level, job.version)
        delay = faults.delay("flush")
        if delay:
            time.sleep(delay)
        try:
            with self.tracer.span(f"flush {level.name}", "ckpt", iteration=job.version):
                result = save_and_commit(level, job.version, slot.arrays, self.state.save_pieces, slot.objects,
                                         self.layout, self.group, self.tracer)
            self.stats.flushes.append(FlushRecord(level.name, job.version, result.bytes_written, result.seconds))
        except CheckpointWriteError as error:
            self.stats.flushes.append(FlushRecord(level.name, job.version, 0, 0.0, str(error)))
            self.log(f"WARNING: {level.name} flush of iteration {job.version} to {level.root} failed: {error}; "
                     f"the version stays in L0 (host memory), training goes on, the next version will be tried")

    # -- shutdown ------------------------------------------------------------------------------------
    def _pending_locked(self) -> list[str]:
        return [f"{j.level.name} iteration {j.version}" for j in self._flush_queue]

    def wait_idle(self, drain: bool = True) -> float:
        """Wait until the copy (and, with ``drain``, every queued flush) is done, with a progress
        line every 10 s; returns the seconds waited."""
        started = time.perf_counter()
        with self._lock:
            self._release_copies_locked()
            if not drain:  # drop queued flushes; one already running finishes on its own
                keep = 1 if self._flushing and self._flush_queue else 0
                for job in list(self._flush_queue)[keep:]:
                    job.release()
                self._flush_queue = collections.deque(list(self._flush_queue)[:keep])
            waiting = self._pending_locked()
            if waiting:
                self.log(f"> waiting for {len(waiting)} checkpoint flush(es): {', '.join(waiting)} ...")
            last_line = started
            while self._issuing or self._landing or (drain and (self._flush_queue or self._flushing)):
                self._lock.wait(timeout=10)
                if self._flush_queue and time.perf_counter() - last_line >= 10:
                    last_line = time.perf_counter()
                    self.log(f"  still flushing ({', '.join(self._pending_locked())}), {last_line - started:.0f} s")
        if waiting and drain:
            self.log(f"> checkpoint flushes done in {time.perf_counter() - started:.1f} s")
        return time.perf_counter() - started

    def close(self, drain: bool = True) -> None:
        """Stop the threads. With ``drain``, finish every queued copy and flush first (normal exit,
        SIGTERM); without, finish only the copy in progress, so L0 holds a whole version (after an
        error, when peers may be gone and a flush could block in a collective)."""
        self.wait_idle(drain)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if drain:
            for t in self._threads:
                t.join()
            self.copier.unregister()
