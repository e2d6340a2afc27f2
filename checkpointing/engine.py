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

**Zero-copy snapshots** (``zero_copy``: the state lives on the host, as on a CPU). The optimizer
step itself writes each new version out of place into a pool slot (``begin_step`` /
``end_step``), so that slot *is* the snapshot: no copy, no copy thread. ``request(N)`` only
describes the slot step N wrote and queues its flushes. A slot is overwritten only by a later
step, and the fence then guards the rule literally: before the step writes shard *i* into a slot,
it waits only if a flush of that slot has not read shard *i* yet (the writer reports, piece by
piece, how far it has read).

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

import bisect
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


def _account_cpu(stats: "EngineStats") -> None:
    """Record the calling engine thread's CPU clock (cheap: one clock read)."""
    stats.thread_cpu_seconds[threading.current_thread().name] = time.thread_time()


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
    bytes_copied: int = 0
    """Bytes copied into the pool for snapshots (0 with zero-copy snapshots, except a version
    requested without a step before it, e.g. right after a load)."""
    flushes: list[FlushRecord] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    thread_cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU time each engine thread has used (its thread CPU clock), by thread name: what the
    engine takes from training on a host with few cores, whether or not training waits."""

    @property
    def cpu_seconds(self) -> float:
        """CPU time of all the engine's threads together."""
        return sum(self.thread_cpu_seconds.values())


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
    objects: dict | None = None
    """The version's small objects, kept with the job: with zero-copy snapshots a slot may be
    taken for a newer step before a queued flush of it has started."""
    shards_read: int = 0
    """Zero-copy: shards ``0 .. shards_read - 1`` of the slot are written out by this flush."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot.pins -= 1


class CheckpointEngine:
    """One rank's engine; every rank of the job creates one with the same configuration."""

    def __init__(self, state: CheckpointableState, pool: HostPool, levels: list[Level], group,
                 log: Callable[[str], None] = print, layout: dict | None = None, tracer=None,
                 zero_copy: bool = False):
        """``zero_copy``: the state's owner writes each step into a pool slot (``begin_step``);
        needs at least two slots (the current version and the one being written)."""
        if zero_copy and len(pool.slots) < 2:
            raise ValueError("zero-copy snapshots need at least 2 host-pool slots (the current version and "
                             "the next); raise --ckpt-host-versions or --ckpt-host-budget-gb")
        self.zero_copy = zero_copy
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
        self.read_hook: Callable[[int], None] | None = None
        """Test hook (zero-copy): called by the flush thread with the number of leading shards of
        its slot it has read, each time that number grows."""
        self._lock = threading.Condition()
        self._copy_queue: collections.deque = collections.deque()
        self._flush_queue: collections.deque[_Job] = collections.deque()
        self._landing: set[HostSlot] = set()
        """Slots whose copy is not complete in host memory yet (not reusable, not flushable)."""
        self._land_queue: collections.deque = collections.deque()
        self.copier = None if zero_copy else copier_for(state.arrays, len(state.shards))
        if self.copier is not None:
            for slot in pool.slots:
                self.copier.register(slot.memory)
        self._current: HostSlot | None = None
        """Zero-copy: the slot the last step wrote (the state's current version), once there is one."""
        self._target: HostSlot | None = None
        """Zero-copy: the slot the running step writes."""
        self._shards_read_after = self._shards_read_after_pieces()
        self._issuing = False
        """The copy thread has not yet started every shard's copy of the newest request."""
        self._flushing = False
        self._closed = False
        self._iteration = 0
        self._requested = -1
        """The newest version queued for copying."""
        self._last_objects: tuple[int, dict | None] = (-1, None)
        """The newest requested version and its small objects (its slot is described later)."""
        self._copy_released = -1
        """Under a ``GPT_CKPT_HOLD`` of ``copy`` (``checkpointing.faults``): versions up to this one
        may be copied."""
        # Read once: unset (every real run), the request path pays one attribute test for them.
        self._hold_copies = faults.holds("copy")
        self._hold_requests = faults.holds("request")
        self._hold_flushes = zero_copy and faults.holds("flush")
        self._fence_blocked_on: HostSlot | None = None
        """Zero-copy: the slot a fence is waiting on (a held flush of it may go on)."""
        self._draining = False
        if self._hold_copies and self.copier is not None:
            self.copier.on_block = self._release_copies
        loops = [(self._land_loop, "ckpt-land"), (self._flush_loop, "ckpt-flush")]
        if not zero_copy:
            loops.insert(0, (self._copy_loop, "ckpt-copy"))
        self._threads = [threading.Thread(target=_named(loop), name=name, daemon=True) for loop, name in loops]
        for t in self._threads:
            t.start()

    @classmethod
    def for_config(cls, cfg, state: CheckpointableState, group, log, rank: int, layout: dict,
                   tracer=None, local_peers: list[int] | None = None,
                   zero_copy_refused: str | None = "the state's owner does not write out of place") -> "CheckpointEngine":
        """``local_peers``: the ranks sharing this rank's ``--ckpt-local-dir`` (its node).
        ``zero_copy_refused``: why the state cannot take zero-copy snapshots (None: it can);
        ``cfg.snapshot`` ``auto`` then takes zero-copy where it can, ``zero-copy`` insists."""
        zero_copy = cfg.snapshot != "copy" and zero_copy_refused is None
        if cfg.snapshot == "zero-copy" and not zero_copy:
            raise ValueError(f"--ckpt-snapshot zero-copy: {zero_copy_refused}; use --ckpt-snapshot copy (or auto)")
        specs = {name: ArraySpec(a.numel(), a.dtype) for name, a in state.arrays.items()}
        budget = int(cfg.host_budget_gb * 2**30) if cfg.host_budget_gb else None
        # Zero-copy: one slot more than the versions kept, for the step being written.
        slots = cfg.host_versions + 1 if zero_copy else cfg.host_versions
        pool = HostPool(job_tag(cfg.save), rank, specs, slots, budget, cfg.host_dir)
        rate = cfg.write_rate_limit_mb * 1e6 if cfg.write_rate_limit_mb else None
        levels = []
        if cfg.local_dir:
            levels.append(Level("L1", cfg.local_dir, cfg.local_interval, cfg.local_retain_last, local_peers, rate))
        levels.append(Level("L2", cfg.save, cfg.l2_interval, cfg.save_retain_last, None, rate))
        how = "zero-copy: steps write into the pool" if zero_copy else "copied beside the next step"
        log(f"> async checkpointing: L0 {len(pool.slots)} slots in shared memory ({pool.bytes / 2**30:.2f} GiB "
            f"per rank; {how}); " + "; ".join(f"{lv.name} {lv.root} every {lv.interval}" for lv in levels)
            + (f"; writes at most {cfg.write_rate_limit_mb:g} MB/s per rank" if rate else ""))
        return cls(state, pool, levels, group, log, layout, tracer, zero_copy)

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
            if self.zero_copy:
                slot = self._current_locked()  # the step already wrote this version there
                slot.version, slot.objects, slot.layout = version, None, None
                self._landing.add(slot)  # until described (the L0 commit), by the landing thread
                self._requested = version
                self._land_queue.append((slot, version, objects, time.perf_counter(), None))
            else:
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
            self._last_objects = (version, objects)
            for level in due:
                slot.pins += 1
                self._flush_queue.append(_Job(level, version, slot, forced=force_flush, objects=objects))
            self._lock.notify_all()
        blocked = time.perf_counter() - started
        self.stats.requests += 1
        self.stats.request_seconds += blocked
        self._add_stall(blocked, version)
        for index, iteration, seconds in (self.copier.device_waits() if self.copier else ()):  # GPU-side waits
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
            objects = self._last_objects[1] if self._last_objects[0] == version else slot.objects
            for level in self.levels:
                if not level.is_due(version):
                    slot.pins += 1
                    self._flush_queue.append(_Job(level, version, slot, forced=True, objects=objects))
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
        """Before the optimizer writes shard ``shard_index``: wait for its copy if not done
        (zero-copy: for every flush of the slot being written to have read it)."""
        if self.zero_copy:
            waited = self._wait_flushes_read(shard_index)
        else:
            waited = self.copier.fence(shard_index, self._iteration)
        if waited is None:  # the common case: no clock read, no lock
            return
        ended_ns = time.perf_counter_ns()
        self.tracer.complete(f"fence wait shard {shard_index}", "ckpt", ended_ns - int(waited * 1e9), ended_ns)
        self.stats.fence_waits += 1
        self.stats.stall_by_shard[shard_index] += waited
        self._add_stall(waited, self._iteration)

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
        faults.reach("step", self._iteration)  # fault-injection tests kill a rank inside a step here
        with self._lock:
            current = self._current
            if current is not None and current.version is None:  # scratch: no version, nothing reads it
                self._target = current
                return None
            # Not a slot whose description (the L0 commit) is still being written: it would
            # describe bytes this step overwrites. That write is short; wait for it if need be.
            while not (others := [s for s in self.pool.slots if s is not self._current and s not in self._landing]):
                self._lock.wait()
            target = min(others, key=lambda s: (s.pins > 0, s.version is not None, s.version or 0))
            target.version = target.objects = target.layout = None
            self._target = target
        target.remove_description()  # before its first byte changes: a crash must not recover it
        return target.arrays

    def end_step(self) -> None:
        """The step wrote every shard of :meth:`begin_step`'s arrays (or the current slot's, in
        place): they are the current version."""
        with self._lock:
            self._current, self._target = self._target, None

    def _current_locked(self) -> HostSlot:
        """The slot holding the state now. Without a step since the engine started (a request
        right after a load), the state is copied into a free slot first: the one copy zero-copy
        snapshots make."""
        if self._current is None:
            slot = self._free_slot_locked()
            while slot is None:
                self.stats.backpressure_waits += 1
                self._lock.wait()
                slot = self._free_slot_locked()
            slot.remove_description()
            for name, live in self.state.arrays.items():
                slot.arrays[name].copy_(live)
                self.stats.bytes_copied += live.numel() * live.element_size()
            self._current = slot
        return self._current

    def _wait_flushes_read(self, shard_index: int) -> float | None:
        """Zero-copy fence: wait until every flush of the slot being written has read
        ``shard_index``; the seconds waited, or None without a wait."""
        target = self._target
        if target is None or target.pins == 0:  # only this thread adds pins: no flush, no wait
            return None
        started = time.perf_counter()
        waited = False
        with self._lock:
            while any(j.slot is target and not j.released and j.shards_read <= shard_index for j in self._flush_queue):
                waited = True
                self._fence_blocked_on = target
                self._lock.notify_all()  # a held flush of it goes on (GPT_CKPT_HOLD=flush)
                self._lock.wait()
            self._fence_blocked_on = None
        return time.perf_counter() - started if waited else None

    def _shards_read_after_pieces(self) -> list[int]:
        """For each save piece i (in write order), how many leading shards are wholly read once
        it is written: the lowest shard of any piece still to come (the trainer's pieces come
        shard by shard, so shard s is read right after its last piece)."""
        starts = [lo for lo, _ in self.state.shards]
        shard_of = [bisect.bisect_right(starts, p.start) - 1 for p in self.state.save_pieces]
        read, lowest_to_come = [0] * len(shard_of), len(starts)
        for i in range(len(shard_of) - 1, -1, -1):
            read[i] = lowest_to_come
            lowest_to_come = min(lowest_to_come, shard_of[i])
        return read

    def _progress_of(self, job: _Job) -> Callable[[int], None]:
        def progress(index: int) -> None:
            read = self._shards_read_after[index]
            if read > job.shards_read:
                with self._lock:
                    job.shards_read = read
                    self._lock.notify_all()
                if self.read_hook is not None:
                    self.read_hook(read)

        return progress

    def active(self) -> bool:
        """Whether any background work (copy, description, flush) is queued or running."""
        with self._lock:
            return bool(self._issuing or self._copy_queue or self._landing or self._flush_queue)

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
            _account_cpu(self.stats)
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
            if landed is not None:
                self.copier.wait_landed(landed)
            slot.describe(version, objects, self.layout)
            _account_cpu(self.stats)
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
                if self._hold_flushes and faults.holds("flush", job.version):
                    while self._fence_blocked_on is not job.slot and not self._draining:
                        self._lock.wait()
                superseded = job.orphaned or not (job.forced or self._hold_flushes) and any(
                    j.level is job.level and j.version > job.version for j in list(self._flush_queue)[1:])
            # Every rank must agree: skip if any rank already sees a newer version for this level
            # (or took this version's slot for a newer one).
            flag = torch.tensor([1 if superseded else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item():
                self.stats.skipped[job.level.name] += 1
            else:
                self._flush(job)
            _account_cpu(self.stats)
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
                result = save_and_commit(level, job.version, slot.arrays, self.state.save_pieces, job.objects,
                                         self.layout, self.group, self.tracer,
                                         self._progress_of(job) if self.zero_copy else None)
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
            self._draining = True  # held flushes (GPT_CKPT_HOLD=flush) go on
            self._lock.notify_all()
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
            if self.copier is not None:
                self.copier.unregister()
