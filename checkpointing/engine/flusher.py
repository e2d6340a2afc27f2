"""The flusher process: one per rank, beside the trainer, doing all of the engine's background work.

The training process's engine (``checkpointing.engine.checkpoint_engine``) starts it once, as
``python -m checkpointing.engine.flusher FD PPID``, over one end of a private socket pair. It maps the
L0 pool's shared-memory slots (the same pages the optimizer writes), and then, for the jobs the
training thread sends:

- writes each version's slot description, the L0 commit (``describe``);
- flushes versions to L1/L2 with the commit protocol, checksums and retention (``job``): each
  job's skip is agreed with the other ranks' flushers by one all-reduce on a gloo group of the
  flushers alone, so every rank writes the same versions;
- reports each shard of a slot it has read in the control block (``checkpointing.engine.control_block``),
  where the training thread's zero-copy fences read it, and its CPU clock and a heartbeat.

It runs with one intra-op thread, at a lower CPU and I/O priority than training, with the
garbage collector's generations frozen after start-up, and imports only the checkpoint layer and
torch. It dies with its trainer (``PR_SET_PDEATHSIG``, and the end of the socket), so no process
outlives its job, and a trainer killed mid-flush leaves only an uncommitted directory.

The messages to and from the engine, and their order, are ``checkpointing.engine.protocol``'s.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from checkpointing.base import faults
from checkpointing.base.agreement import any_rank
from checkpointing.base.durable import CheckpointWriteError
from checkpointing.base.levels import PEER, Level
from checkpointing.engine import control_block as cb
from checkpointing.engine import flush_rules
from checkpointing.engine.pacing import flusher_pacing
from checkpointing.engine.protocol import (
    TO_FLUSHER,
    Abort,
    Describe,
    Described,
    Done,
    Fatal,
    FlusherSpec,
    FlushJob,
    FlushResult,
    Ready,
    Stop,
    Stopped,
    receive,
    send,
)
from checkpointing.format.commit import save_and_commit
from checkpointing.format.save_plan import SavePlan
from checkpointing.format.writer import encode_item
from checkpointing.storage.host_pool import description_blob, encode_pieces, map_arrays, write_description
from checkpointing.storage.peer_replicas import ReplicaExchange

HEARTBEAT_SECONDS = 0.5


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
        self.progress_points = [read > before for before, read in zip([0, *self.read_after], self.read_after)]
        """The pieces after which more shards are read: the writer reports progress there (and
        after each batch it writes), not after every piece."""
        self.pieces_encoded = encode_pieces(spec.pieces)
        """The pieces as every description of this flusher's slots holds them: encoded once."""
        self.pacing = flusher_pacing(block, spec.rank)
        self.replicas = ReplicaExchange(spec.replicas, spec.rank, group) if spec.replicas else None
        self.tracer = _RecordingTracer() if spec.trace else None
        self.queue: collections.deque[FlushJob] = collections.deque()
        self.node_groups = _node_groups(spec.levels, group)
        """Each node-local level's group of this rank's node (its commit gathers over it)."""
        self.save_plans: dict[str, SavePlan] = {}
        """Each level's save plan (``checkpointing.format.save_plan``), built at its first committed flush."""
        self.small_states: dict[int, dict] = {}
        """Each request's small state (encoded: ``writer.EncodedItem`` values), kept while a queued job
        or the newest request needs it."""
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
                self.send(Fatal(traceback.format_exc()))
            finally:
                os._exit(1)

    def _receive(self) -> None:
        while True:
            self.beat()
            try:
                if not self.conn.poll(HEARTBEAT_SECONDS):
                    continue
                message = receive(self.conn, TO_FLUSHER)
            except (EOFError, OSError):
                os._exit(3)  # the trainer is gone: so is this job's checkpointing (nothing half-written is committed)
            if isinstance(message, Describe):
                faults.reach("describe", message.version)
                time.sleep(faults.delay("describe"))  # a slow L0 commit (tests/test_engine_holds.py)
                error = None
                # Encoded once: the description and every level's rank file hold the same bytes.
                small_state = {name: encode_item(value) for name, value in message.small_state.items()}
                try:
                    write_description(self.spec.meta_paths[message.slot], message.version, small_state,
                                      self.spec.layout, self.pieces_encoded, self.spec.specs)
                except CheckpointWriteError as e:
                    error = str(e)
                with self.cond:
                    self.small_states[message.seq] = small_state
                    self.newest_seq = max(self.newest_seq, message.seq)
                self.block[cb.DESCRIBED] = message.seq
                self.send(Described(message.seq, error))
            elif isinstance(message, FlushJob):
                self.spec.level(message.level)  # a level this flusher has, or refused now
                with self.cond:
                    self.queue.append(message)
                    self.cond.notify_all()
            elif isinstance(message, Abort):  # after an error: what was sent before is described; flushes are dropped
                os._exit(0)
            elif isinstance(message, Stop):
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
            level = self.spec.level(job.level)
            with self.cond:
                later = [flush_rules.JobState(j.id, j.level, j.version, None) for j in list(self.queue)[1:]]
            state = flush_rules.JobState(job.id, level.name, job.version, None, job.forced, orphaned)
            skip = flush_rules.supersedes(state, later, self.pacing.may_supersede)
            # Every rank must agree: skip if any rank sees a newer version for this level (or took
            # this version's slot for a newer one).
            skip = any_rank(self.group, skip)
            record = None if skip else self.replicate(job) if level.name == PEER else self.flush(job, level)
            self.block[cb.DONE] = job.id
            self.block[cb.CPU_NS] = time.process_time_ns()
            with self.cond:
                self.queue.popleft()
                needed = {j.seq for j in self.queue} | {self.newest_seq}
                for seq in [s for s in self.small_states if s not in needed]:
                    del self.small_states[seq]
            self.send(Done(job.id, record, tuple(self.tracer.take()) if self.tracer else ()))
            faults.reach("flusher.idle", job.version)  # fault trials kill the flusher between jobs here

    def flush(self, job: FlushJob, level: Level) -> FlushResult:
        """Write one version to one level."""
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
            result = save_and_commit(level, job.version, self.slots[job.slot], list(self.spec.pieces), small_state,
                                     self.spec.layout, self.group, tracer=tracer, progress=progress,
                                     progress_points=self.progress_points, plan=plan,
                                     node_group=self.node_groups.get(level.name))
            if tracer is not None:
                tracer.complete(f"flush {level.name}", "ckpt", started, time.perf_counter_ns(), iteration=job.version)
            return FlushResult(result.bytes_written, result.seconds, None, time.process_time())
        except CheckpointWriteError as error:
            return FlushResult(0, 0.0, str(error), time.process_time())

    def replicate(self, job: FlushJob) -> FlushResult:
        """Send one version to this rank's partners and receive its sources' (``checkpointing.storage.peer_replicas``);
        returns (bytes sent, seconds, error)."""
        faults.reach("peer.write", job.version)
        with self.cond:
            small_state = self.small_states[job.seq]
        spec, block = self.spec, self.block  # no test pacing here: a held exchange would hold its partners
        description = description_blob(job.version, small_state, spec.layout, self.pieces_encoded, spec.specs,
                                       source=spec.rank, shards=[tuple(s) for s in spec.shards])
        started = time.perf_counter_ns()

        def sent(index: int) -> None:
            block[cb.FLUSH_ALIVE_NS] = time.monotonic_ns()
            block.set_progress(job.id, index + 1)

        nbytes, seconds, error = self.replicas.exchange(job.version, description, self.slots[job.slot],
                                                        list(spec.shards), sent)
        if self.tracer is not None:
            self.tracer.complete("replicate", "ckpt", started, time.perf_counter_ns(), iteration=job.version)
        return FlushResult(nbytes, seconds, error, time.process_time())

    def _progress(self, job: FlushJob):
        """The writer's ``progress(i)`` (pieces ``0..i`` written), after each of
        :attr:`progress_points` and each batch written (a few calls a version): the flush marks
        itself alive, and the shards read so far go to the control block when they grow (fences
        wait on them)."""
        read_after, block, pacing = self.read_after, self.block, self.pacing
        state = [0]  # shards read

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
        spec: FlusherSpec = receive(conn, (FlusherSpec,))
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
        send(conn, Ready(time.monotonic() - started, _resident_bytes(), time.process_time()))
        flusher.run()
        dist.destroy_process_group()
        send(conn, Stopped(time.process_time()))
        return 0
    except BaseException:  # noqa: BLE001 - reported to the trainer whole, then this process ends
        try:
            send(conn, Fatal(traceback.format_exc()))
        except OSError:
            pass
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
