"""The ways of checkpointing every iteration that the CPU bench's ``overhead`` part compares:
this engine in its configurations, a CheckFreq-style copy thread, a copy floor, torch.save, DCP's
save and async_save. Each is a :class:`Method`: ``checkpoint(it)`` runs after the step, and
``blocked`` keeps the time it held the training thread per checkpoint."""

from __future__ import annotations

import os
import time

from benchmarks.ckpt_state import flat_state


class Method:
    """One way of checkpointing every iteration; ``checkpoint(it)`` runs after the step."""

    name = "none"

    def __init__(self, trainer, workdir):
        self.trainer, self.workdir = trainer, workdir
        self.blocked: list[float] = []

    def start(self):
        pass

    def checkpoint(self, iteration: int) -> None:
        pass

    def stop(self):
        pass


class EngineMethod(Method):
    def __init__(self, trainer, workdir, name, l1_interval, l2_interval, slots, write_rate=None, zero_copy=False):
        """``zero_copy``: the optimizer step writes each version into a pool slot (``slots``
        counts the one being written too)."""
        super().__init__(trainer, workdir)
        import torch.distributed as dist

        from checkpointing.base import L1, L2, Level
        from checkpointing.engine import CheckpointEngine
        from checkpointing.storage import ArraySpec, HostPool
        from trainer.checkpoint_state import TrainerCheckpointState

        self.name = name
        state = TrainerCheckpointState(trainer)
        specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
        pool = HostPool(f"bench-{name.replace(' ', '_')}-{os.getpid()}", 0, specs, slots, None)
        levels = []
        if l1_interval:
            levels.append(Level(L1, os.path.join(workdir, name.replace(" ", "_"), "l1"), l1_interval, 1))
        levels.append(Level(L2, os.path.join(workdir, name.replace(" ", "_"), "l2"), l2_interval, 1, None, write_rate))
        self.engine = CheckpointEngine(state, pool, levels, dist.new_group(backend="gloo"), lambda m: None,
                                       zero_copy=zero_copy)

    def start(self):
        self._in_fences = 0.0
        self.trainer.optimizer.before_shard_update[:] = [self._fence]
        if self.engine.zero_copy:
            from trainer.checkpointer import _PoolVersions

            self.trainer.optimizer.versions = _PoolVersions(self.engine)

    def _fence(self, shard):
        started = time.perf_counter()
        self.engine.fence(shard.index)
        self._in_fences += time.perf_counter() - started

    def checkpoint(self, iteration):
        """Blocked: the wall time of the request and of every fence call of the step before it
        (whether it waited or not), measured here rather than taken from the engine's stall."""
        started = time.perf_counter()
        self.engine.request(iteration)
        self.blocked.append(time.perf_counter() - started + self._in_fences)
        self._in_fences = 0.0

    def stop(self):
        self.engine.wait_idle(drain=True)
        self.trainer.optimizer.before_shard_update[:] = []
        self.persisted = sum(f.error is None for f in self.engine.stats.flushes)
        self.bytes_copied = self.engine.stats.bytes_copied

    def close(self):
        from checkpointing.storage import remove_pool

        self.engine.close(drain=True)
        remove_pool(self.engine.pool)  # slots, descriptions and the control block


class CheckFreqStyle(Method):
    """The simple design the engine generalises (CheckFreq's): after the step, one thread copies
    the whole state into a pre-touched host buffer and writes it raw (``O_DIRECT``, no framing, no
    checksums, no commit); one global fence: the next step waits until the copy is done."""

    name = "CheckFreq-style: copy thread + raw O_DIRECT write, one global fence"

    def start(self):
        import mmap
        import threading

        import torch

        state = flat_state(self.trainer)
        total = sum(a.numel() for a in state.values())
        self._memory = mmap.mmap(-1, -(-total * 4 // 4096) * 4096)  # page-aligned, as O_DIRECT needs
        self.buffer = torch.frombuffer(self._memory, dtype=torch.float32, count=total)
        self.buffer.fill_(0)  # touched once, now
        self.copied = threading.Event()
        self.copied.set()
        self.written = threading.Event()
        self.written.set()
        self.thread = None
        self._in_fence = 0.0
        self.trainer.optimizer.before_shard_update[:] = [self._fence]

    def _fence(self, shard):
        if shard.index == 0 and not self.copied.is_set():
            started = time.perf_counter()
            self.copied.wait()
            self._in_fence += time.perf_counter() - started

    def _work(self):
        import mmap

        at = 0
        for array in flat_state(self.trainer).values():
            self.buffer[at : at + array.numel()].copy_(array)
            at += array.numel()
        self.copied.set()
        raw = memoryview(self.buffer.numpy()).cast("B")
        path = os.path.join(self.workdir, "checkfreq.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            body = len(raw) // 4096 * 4096
            os.write(fd, raw[:body])
            if len(raw) > body:
                tail = mmap.mmap(-1, 4096)
                tail[: len(raw) - body] = raw[body:]
                os.write(fd, tail)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.written.set()

    def checkpoint(self, iteration):
        import threading

        started = time.perf_counter()
        self.written.wait()  # one version in flight
        self.copied.clear()
        self.written.clear()
        self.thread = threading.Thread(target=self._work, name="ckpt-checkfreq", daemon=True)
        self.thread.start()
        self.blocked.append(time.perf_counter() - started + self._in_fence)
        self._in_fence = 0.0

    def stop(self):
        self.written.wait()
        self.trainer.optimizer.before_shard_update[:] = []


class CopyFloor(Method):
    """Not a checkpoint: one synchronous copy of the whole state per iteration, on the training
    thread, into a pre-touched buffer. Every design that puts each version somewhere else in host
    memory moves at least these bytes; on this machine that is what L0 every iteration costs at
    the least (unless the copy overlaps with compute and takes no core from it)."""

    name = "floor: one synchronous copy of the state per iteration (not a checkpoint)"

    def start(self):
        import torch

        self.buffers = {k: torch.empty_like(v).fill_(0) for k, v in flat_state(self.trainer).items()}

    def checkpoint(self, iteration):
        started = time.perf_counter()
        for name, array in flat_state(self.trainer).items():
            self.buffers[name].copy_(array)
        self.blocked.append(time.perf_counter() - started)


class TorchSave(Method):
    name = "torch.save + fsync"

    def checkpoint(self, iteration):
        import torch

        started = time.perf_counter()
        path = os.path.join(self.workdir, "torch_save.pt")
        with open(path, "wb") as f:
            torch.save(flat_state(self.trainer), f)
            f.flush()
            os.fsync(f.fileno())
        self.blocked.append(time.perf_counter() - started)


class DcpSave(Method):
    name = "DCP save"

    def checkpoint(self, iteration):
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        dcp.save(flat_state(self.trainer), checkpoint_id=os.path.join(self.workdir, "dcp_sync"))
        self.blocked.append(time.perf_counter() - started)


class DcpAsync(Method):
    def __init__(self, trainer, workdir, kind):
        super().__init__(trainer, workdir)
        self.kind = kind
        self.name = f"DCP async_save ({kind})"
        self.future = None

    def checkpoint(self, iteration):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        started = time.perf_counter()
        if self.future is not None:
            self.future.result()  # DCP allows one async save in flight
        kind = AsyncCheckpointerType.PROCESS if self.kind == "process" else AsyncCheckpointerType.THREAD
        self.future = dcp.async_save(flat_state(self.trainer), checkpoint_id=os.path.join(self.workdir, f"dcp_{self.kind}"),
                                     async_checkpointer_type=kind)
        self.blocked.append(time.perf_counter() - started)

    def stop(self):
        if self.future is not None:
            self.future.result()
            self.future = None


class DcpAsyncStaged(Method):
    """DCP's best staging on CPU: one ``DefaultStager`` for the whole run, so its staging buffers
    are allocated once and reused (``async_save`` otherwise stages into fresh memory each time),
    with asynchronous staging (a background thread copies, beside forward and backward) and one
    global fence: the optimizer's first shard update waits until staging is done, as DCP's
    ``staging_completion`` requires before the state changes."""

    name = "DCP async_save (thread), async staging, reused buffers"

    def start(self):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                   use_async_staging=True, use_non_blocking_copy=False))
        self.response = None
        self._in_fence = 0.0
        self.trainer.optimizer.before_shard_update[:] = [self._fence]

    def _fence(self, shard):
        if self.response is not None and not self.response.staging_completion.done():
            started = time.perf_counter()
            self.response.staging_completion.result()
            self._in_fence += time.perf_counter() - started

    def checkpoint(self, iteration):
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        if self.response is not None:
            self.response.upload_completion.result()  # the staging buffers are reused: the last upload must be done
        self.response = dcp.async_save(flat_state(self.trainer), checkpoint_id=os.path.join(self.workdir, "dcp_staged"),
                                       async_stager=self.stager)
        self.blocked.append(time.perf_counter() - started + self._in_fence)
        self._in_fence = 0.0

    def stop(self):
        if self.response is not None:
            self.response.upload_completion.result()
        self.trainer.optimizer.before_shard_update[:] = []
        self.stager.close()


WRITE_RATE_LIMIT_MB = 200
"""``--ckpt-write-rate-limit`` of the limited engine row: 1 GB takes 5 s to write, about two
iterations here, so about one version in two or three reaches the disk."""

METHODS = {
    "none": lambda t, w: Method(t, w),
    "engine-l0": lambda t, w: EngineMethod(t, w, "engine L0 every it + L1 every 10th", 10, 10**9, 2),
    "engine-disk": lambda t, w: EngineMethod(t, w, "engine every it to disk (L2, 3 slots)", None, 1, 3),
    "engine-disk-limited": lambda t, w: EngineMethod(t, w, "engine every it to disk, limited", None, 1, 3,
                                                     WRITE_RATE_LIMIT_MB * 1e6),
    "engine-zc-l0": lambda t, w: EngineMethod(t, w, "engine zero-copy L0 + L1 every 10th", 10, 10**9, 3, zero_copy=True),
    "engine-zc-disk": lambda t, w: EngineMethod(t, w, "engine zero-copy every it to disk", None, 1, 3, zero_copy=True),
    "checkfreq": lambda t, w: CheckFreqStyle(t, w),
    "copy-floor": lambda t, w: CopyFloor(t, w),
    "torch-save": lambda t, w: TorchSave(t, w),
    "dcp": lambda t, w: DcpSave(t, w),
    "dcp-async-thread": lambda t, w: DcpAsync(t, w, "thread"),
    "dcp-async-process": lambda t, w: DcpAsync(t, w, "process"),
    "dcp-async-staged": lambda t, w: DcpAsyncStaged(t, w),
}


def split_spec(spec: str) -> tuple[str, str]:
    """``engine-l0@passive`` -> (``engine-l0``, ``PASSIVE``); no suffix: OpenMP's default."""
    name, _, policy = spec.partition("@")
    return name, policy.upper()


def label(spec: str) -> str:
    name, policy = split_spec(spec)
    return LABELS[name] + (f", OMP_WAIT_POLICY={policy}" if policy else "")


LABELS = {
    "none": "none",
    "engine-l0": "engine L0 every it + L1 every 10th",
    "engine-disk": "engine every it to disk (L2, 3 slots)",
    "engine-disk-limited": f"engine every it to disk (L2, 3 slots), writes <= {WRITE_RATE_LIMIT_MB} MB/s",
    "engine-zc-l0": "engine, zero-copy: L0 every it + L1 every 10th (3 slots)",
    "engine-zc-disk": "engine, zero-copy: every it to disk (L2, 3 slots)",
    "checkfreq": CheckFreqStyle.name,
    "copy-floor": CopyFloor.name,
    "torch-save": "torch.save + fsync",
    "dcp": "DCP save",
    "dcp-async-thread": "DCP async_save (thread)",
    "dcp-async-staged": DcpAsyncStaged.name,
    "dcp-async-process": "DCP async_save (process)",
}
