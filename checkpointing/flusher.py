"""The flusher process: one per rank, beside the trainer, doing all of the engine's background work.

The training process's engine (``checkpointing.engine``) starts it once, as
``python -m checkpointing.flusher FD PPID``, over one end of a private socket pair. It maps the
L0 pool's shared-memory slots (the same pages the optimizer writes), and then, for the jobs the
training thread sends:

- writes each version's slot description, the L0 commit (``describe``);
- flushes versions to L1/L2 with the commit protocol, checksums and retention (``job``): each
  job's skip is agreed with the other ranks' flushers by one all-reduce on a gloo group of the
  flushers alone, so every rank writes the same versions;
- reports each shard of a slot it has read in the control block (``checkpointing.control_block``),
  where the training thread's zero-copy fences read it, and its CPU clock and a heartbeat.

It runs with one intra-op thread, at a lower CPU and I/O priority than training, with the
garbage collector's generations frozen after start-up, and imports only the checkpoint layer and
torch. It dies with its trainer (``PR_SET_PDEATHSIG``, and the end of the socket), so no process
outlives its job, and a trainer killed mid-flush leaves only an uncommitted directory.

Messages (pickled by this job's own processes over a socket pair no one else holds):
trainer -> flusher ``("describe", seq, slot, version, small_state)``, ``("job", id, level, version,
slot, seq, forced)``, ``("stop",)`` (after the last job), ``("abort",)`` (drop the queue, exit); flusher -> trainer ``("ready", seconds, rss, cpu)``,
``("described", seq, error)``, ``("done", id, record, spans)``, ``("fatal", text)``.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from checkpointing import control_block as cb
from checkpointing import faults, flush_rules
from checkpointing.commit import save_and_commit
from checkpointing.durable import CheckpointWriteError
from checkpointing.host_pool import ArraySpec, description_blob, map_arrays, write_description
from checkpointing.items import TensorPiece
from checkpointing.levels import PEER, Level
from checkpointing.pacing import flusher_pacing
from checkpointing.parallel_layout import ParallelLayout
from checkpointing.peer_replicas import ReplicaExchange, ReplicaSpec
from checkpointing.save_plan import SavePlan

HEARTBEAT_SECONDS = 0.5


def send(conn: Connection, message) -> None:
    """Plain pickle over the socket: ``Connection.send`` pickles tensors by handing out shared
    memory through a multiprocessing server that this (not multiprocessing-started) process
    cannot authenticate to; the bytes themselves are what crosses."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection):
    """A message of :func:`send` (from this job's own process, over a private socket pair)."""
    return pickle.loads(conn.recv_bytes())


@dataclass(frozen=True)
class FlusherSpec:
    """What a flusher needs to know, sent once by its trainer."""

    rank: int
    world_size: int
    store: tuple[str, int] | None
    """The job's TCP store (host, port) its group meets at; None: a one-rank job."""
    store_prefix: str
    """Keys of this engine's flusher group in that store (unique per engine of the job)."""
    group_timeout_seconds: float
    control_path: str
    slot_paths: list[str]
    meta_paths: list[str]
    specs: dict[str, ArraySpec]
    shards: list[tuple[int, int]]
    pieces: list[TensorPiece]
    levels: list[Level]
    layout: ParallelLayout
    trace: bool
    replicas: ReplicaSpec | None = None
    """Peer replicas (``--ckpt-peer-replicas``): whom this rank sends its versions to and whose it holds."""


class _RecordingTracer:
    """Spans of this process, sent to the trainer with each job's result (one monotonic clock:
    ``time.perf_counter_ns`` is CLOCK_MONOTONIC, the same in both processes)."""

    def __init__(self):
        self.spans: list[tuple] = []

    class _Span:
        def __init__(self, tracer, name, category, args):
            self.tracer, self.name, self.category, self.args = tracer, name, category, args

        def __enter__(self):
            self.start = time.perf_counter_ns()

        def __exit__(self, *exc):
            self.tracer.complete(self.name, self.category, self.start, time.perf_counter_ns(), **self.args)

    def span(self, name: str, category: str, **args):
        return self._Span(self, name, category, args)

    def complete(self, name: str, category: str, start_ns: int, end_ns: int, **args) -> None:
        self.spans.append((name, category, start_ns, end_ns, args))

    def take(self) -> list[tuple]:
        spans, self.spans = self.spans, []
        return spans


@dataclass
class _Job:
    id: int
    level: int
    version: int
    slot: int
    seq: int
    forced: bool


def _node_groups(levels: list[Level], group) -> dict[str, Any]:
    """A process group of this rank's node for each node-local level (peers are not everyone):
    made by that node's ranks alone (``use_local_synchronization``: no job-wide barrier per node)."""
    world = dist.get_world_size(group)
    return {level.name: dist.new_group(sorted(level.peers), use_local_synchronization=True)
            for level in levels if level.peers is not None and len(level.peers) < world}


class Flusher:
    def __init__(self, spec: FlusherSpec, conn: Connection, block: cb.ControlBlock, group):
        self.spec, self.conn, self.block, self.group = spec, conn, block, group
        self.slots = [map_arrays(path, spec.specs)[1] for path in spec.slot_paths]
        self.read_after = flush_rules.shards_read_after_pieces([lo for lo, _ in spec.shards],
                                                               [p.start for p in spec.pieces])
        self.pacing = flusher_pacing(block, spec.rank)
        self.replicas = ReplicaExchange(spec.replicas, spec.rank, group) if spec.replicas else None
        self.tracer = _RecordingTracer() if spec.trace else None
        self.queue: collections.deque[_Job] = collections.deque()
        self.node_groups = _node_groups(spec.levels, group)
        """Each node-local level's group of this rank's node (its commit gathers over it)."""
        self.save_plans: dict[str, SavePlan] = {}
        """Each level's save plan (``checkpointing.save_plan``), built at its first committed flush."""
        self.small_states: dict[int, dict] = {}
        """Each request's small state, kept while a queued job or the newest request needs it."""
        self.newest_seq = 0
        self.stopping = False
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()

    def send(self, message) -> None:
        with self.send_lock:
            send(self.conn, message)

    def beat(self) -> None:
        self.block[cb.HEARTBEAT_NS] = time.monotonic_ns()
        self.block[cb.CPU_NS] = time.process_time_ns()

    # -- the receiving thread: descriptions at once, jobs into the queue --------------------------
    def receive(self) -> None:
        try:
            self._receive()
        except BaseException:  # noqa: BLE001 - reported to the trainer whole; this process then ends
            try:
                self.send(("fatal", traceback.format_exc()))
            finally:
                os._exit(1)

    def _receive(self) -> None:
        while True:
            self.beat()
            try:
                if not self.conn.poll(HEARTBEAT_SECONDS):
                    continue
                message = receive(self.conn)
            except (EOFError, OSError):
                os._exit(3)  # the trainer is gone: so is this job's checkpointing (nothing half-written is committed)
            kind = message[0]
            if kind == "describe":
                _, seq, slot, version, small_state = message
                faults.reach("describe", version)
                error = None
                try:
                    write_description(self.spec.meta_paths[slot], version, small_state, self.spec.layout,
                                      self.spec.pieces, self.spec.specs)
                except CheckpointWriteError as e:
                    error = str(e)
                with self.cond:
                    self.small_states[seq] = small_state
                    self.newest_seq = max(self.newest_seq, seq)
                self.block[cb.DESCRIBED] = seq
                self.send(("described", seq, error))
            elif kind == "job":
                with self.cond:
                    self.queue.append(_Job(*message[1:]))
                    self.cond.notify_all()
            elif kind == "abort":  # after an error: what was sent before is described; flushes are dropped
                os._exit(0)
            elif kind == "stop":
                with self.cond:
                    self.stopping = True
                    self.cond.notify_all()
                return

    # -- the flush loop (this process's main thread) ---------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self.receive, name="ckpt-flusher-recv", daemon=True).start()  # its process's only other thread
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                job = self.queue[0]
            self.block[cb.FLUSH_ALIVE_NS] = time.monotonic_ns()
            with self.block.locked():  # from here on the trainer cannot orphan it
                orphaned = self.block.is_orphaned(job.id)
                self.block[cb.CLAIMED] = job.id
            faults.reach("flush", job.version)
            level = self.spec.levels[job.level]
            with self.cond:
                later = [flush_rules.JobState(j.id, self.spec.levels[j.level].name, j.version, None)
                         for j in list(self.queue)[1:]]
            state = flush_rules.JobState(job.id, level.name, job.version, None, job.forced, orphaned)
            skip = flush_rules.supersedes(state, later, self.pacing.may_supersede)
            # Every rank must agree: skip if any rank sees a newer version for this level (or took
            # this version's slot for a newer one).
            flag = torch.tensor([1 if skip else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            record = None if flag.item() else self.replicate(job) if level.name == PEER else self.flush(job, level)
            self.block[cb.DONE] = job.id
            self.block[cb.CPU_NS] = time.process_time_ns()
            with self.cond:
                self.queue.popleft()
                needed = {j.seq for j in self.queue} | {self.newest_seq}
                for seq in [s for s in self.small_states if s not in needed]:
                    del self.small_states[seq]
            self.send(("done", job.id, record, self.tracer.take() if self.tracer else []))
            faults.reach("flusher.idle", job.version)  # fault trials kill the flusher between jobs here

    def flush(self, job: _Job, level: Level) -> tuple:
        """Write one version to one level; returns (bytes, seconds, error)."""
        self.pacing.before_write(job.id, job.slot, job.version)
        delay = faults.delay("flush")
        if delay:
            time.sleep(delay)
        with self.cond:
            small_state = self.small_states[job.seq]
        progress = self._progress(job)
        try:
            tracer = self.tracer
            started = time.perf_counter_ns()
            # One plan per level for this flusher's life (its layout): later versions gather checksums only
            plan = self.save_plans.setdefault(level.name, SavePlan())
            result = save_and_commit(level, job.version, self.slots[job.slot], self.spec.pieces, small_state,
                                     self.spec.layout, self.group, tracer, progress, plan,
                                     self.node_groups.get(level.name))
            if tracer is not None:
                tracer.complete(f"flush {level.name}", "ckpt", started, time.perf_counter_ns(), iteration=job.version)
            return result.bytes_written, result.seconds, None
        except CheckpointWriteError as error:
            return 0, 0.0, str(error)

    def replicate(self, job: _Job) -> tuple:
        """Send one version to this rank's partners and receive its sources' (``checkpointing.peer_replicas``);
        returns (bytes sent, seconds, error)."""
        faults.reach("peer.write", job.version)
        with self.cond:
            small_state = self.small_states[job.seq]
        spec, block = self.spec, self.block  # no test pacing here: a held exchange would hold its partners
        description = description_blob(job.version, small_state, spec.layout, spec.pieces, spec.specs, source=spec.rank,
                                       shards=[tuple(s) for s in spec.shards])
        started = time.perf_counter_ns()

        def sent(index: int) -> None:
            block[cb.FLUSH_ALIVE_NS] = time.monotonic_ns()
            block.set_progress(job.id, index + 1)

        result = self.replicas.exchange(job.version, description, self.slots[job.slot], spec.shards, sent)
        if self.tracer is not None:
            self.tracer.complete("replicate", "ckpt", started, time.perf_counter_ns(), iteration=job.version)
        return result

    def _progress(self, job: _Job):
        read_after, block, pacing = self.read_after, self.block, self.pacing
        state = [0]

        def progress(index: int) -> None:
            read = read_after[index]
            block[cb.FLUSH_ALIVE_NS] = time.monotonic_ns()
            if read > state[0]:
                before, state[0] = state[0], read
                block.set_progress(job.id, read)
                pacing.after_read(job.id, job.slot, before, read)

        return progress


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the trainer dies (Linux ``PR_SET_PDEATHSIG``). SIGTERM and SIGINT
    are ignored: a launcher (torchrun, Slurm) signals the trainer's whole process group, and the
    trainer answers a SIGTERM by draining its flushes through this process, then stopping it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass  # not Linux: the end of the socket still ends this process
    if os.getppid() != parent:  # the trainer died before the call
        os._exit(3)


def _lower_priority() -> None:
    """Training first: CPU niceness 10 and, where the kernel has it, best-effort I/O priority 7."""
    try:
        os.nice(10)
    except OSError:
        pass  # not permitted: normal priority
    try:  # ioprio_set(IOPRIO_WHO_PROCESS, 0 = this process, class best-effort (2) << 13 | level 7)
        ctypes.CDLL(None, use_errno=True).syscall(251 if os.uname().machine == "x86_64" else 30, 1, 0, (2 << 13) | 7)
    except (AttributeError, OSError):
        pass


def _resident_bytes() -> int:
    """Resident memory of this process alone (``Private_Clean`` + ``Private_Dirty``): neither the
    pool's shared pages nor, for a flusher forked from the template, the trainer's pages it still
    shares copy-on-write."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))) * 1024
    except (OSError, ValueError, IndexError):
        return 0


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    started = time.monotonic()
    conn = Connection(fd)
    try:
        spec: FlusherSpec = receive(conn)
    except EOFError:
        return 3
    _lower_priority()
    torch.set_num_threads(1)
    faults.reach("flusher.start")  # a flusher that dies before it can report (tests/test_flusher.py)
    time.sleep(faults.delay("flusher.start"))  # a slow start (tests/test_flusher_template.py)
    block = cb.ControlBlock(spec.control_path, create=False)
    block[cb.PID] = os.getpid()
    block[cb.HEARTBEAT_NS] = time.monotonic_ns()
    try:
        timeout = timedelta(seconds=spec.group_timeout_seconds)
        if spec.store is None:
            store = dist.HashStore()
        else:
            store = dist.TCPStore(spec.store[0], spec.store[1], is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=dist.PrefixStore(spec.store_prefix, store), rank=spec.rank,
                                world_size=spec.world_size, timeout=timeout)
        flusher = Flusher(spec, conn, block, dist.group.WORLD)
        gc.collect()
        gc.freeze()  # what start-up allocated is never scanned again: the loop's garbage is small
        send(conn, ("ready", time.monotonic() - started, _resident_bytes(), time.process_time()))
        flusher.run()
        dist.destroy_process_group()
        send(conn, ("stopped", time.process_time()))
        return 0
    except BaseException:  # noqa: BLE001 - reported to the trainer whole, then this process ends
        try:
            send(conn, ("fatal", traceback.format_exc()))
        except OSError:
            pass
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
