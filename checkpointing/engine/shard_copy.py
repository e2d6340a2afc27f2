"""How the engine copies one shard into the host pool, and how a fence waits for it: per device.

The training thread calls :meth:`copy` shard by shard inside ``request``
(``checkpointing.engine.snapshots``) and :meth:`fence` before the optimizer overwrites a shard; no
thread of the training process copies. The device of the live arrays picks the implementation
(:func:`copier_for`), in this one place:

- **CPU** (:class:`HostShardCopier`): one ``memmove`` per array and shard (the GIL released),
  done when ``request`` returns; its per-shard flags are set at once, so a fence never waits.
- **CUDA** (:class:`CudaShardCopier`): the pool's shared memory is registered with CUDA
  (page-locked, so copies are DMA, not staged); each shard's device-to-host copy is enqueued on
  a dedicated stream, after an event recorded on the training stream at ``request`` (so it
  copies the state after step N, not a later one), with one CUDA event per shard. A fence makes
  the training stream wait for that event: the host never blocks, the GPU waits only if the copy
  is still running. The engine queries the last event at fences and requests; once it has
  completed, the slot is described (committed to L0) and flushed by the flusher process.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable

import torch


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` on this thread alone: ``memmove`` (ctypes releases the GIL) when both
    are contiguous with the same dtype and size, else ``copy_``."""
    if dst.dtype == src.dtype and dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src)


class HostShardCopier:
    """CPU arrays: copies on the calling (training) thread; a fence waits on a per-shard flag,
    set by the time ``request`` returns."""

    on_block: Callable[[], None] | None = None
    """Called by a fence that is about to wait."""

    def __init__(self, num_shards: int):
        self._done = [threading.Event() for _ in range(num_shards)]
        for event in self._done:
            event.set()

    def register(self, memory: torch.Tensor) -> None:
        """Nothing to pin on CPU."""

    def unregister(self) -> None:
        pass

    def begin(self) -> None:
        """On the training thread, at ``request``: every shard is pending from now on."""
        for event in self._done:
            event.clear()

    def copy(self, index: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy ``(destination, source)`` pairs of shard ``index`` (on the calling thread).

        One thread: the copy is bound by memory bandwidth, so ``Tensor.copy_`` with the intra-op
        pool's second thread costs nearly twice the CPU for a little less wall time
        (``scripts/bench_write_cost.py --part cpu``): training needs the CPU more than the copy
        needs the time."""
        for dst, src in pairs:
            copy_bytes(dst, src)
        self._done[index].set()

    def all_started(self):
        """After the last shard: a handle to wait for the bytes to land."""
        return None

    def wait_landed(self, handle) -> None:
        """Block until the bytes of the version ``handle`` belongs to are in host memory (here:
        they are, ``copy`` is synchronous)."""

    def fence(self, index: int, tag: int) -> float | None:
        """Wait until shard ``index`` may be overwritten; the seconds the host waited, or None if
        the copy was done. ``tag`` (the iteration) labels waits measured later (:meth:`device_waits`)."""
        event = self._done[index]
        if event.is_set():
            return None
        started = time.perf_counter()
        if self.on_block is not None:
            self.on_block()
        event.wait()
        return time.perf_counter() - started

    def device_waits(self) -> list[tuple[int, int, float]]:
        """(shard, tag, seconds) of waits that happened on the device since the last call."""
        return []


class CudaShardCopier:
    """CUDA arrays: device-to-host copies on a dedicated stream into registered (pinned) memory,
    one CUDA event per shard as its fence."""

    on_block: Callable[[], None] | None = None
    """Called by a fence whose copy is not enqueued yet, before the host waits for it."""

    def __init__(self, num_shards: int, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._copied = [torch.cuda.Event() for _ in range(num_shards)]
        # request enqueues a shard's copy and records its event; a fence must not look at
        # the event before that, or it would see the previous version's (completed) event.
        self._issued = [threading.Event() for _ in range(num_shards)]
        for event in self._issued:
            event.set()
        self._ready: torch.cuda.Event | None = None
        self._registered: list[int] = []
        self._pending: list[tuple[int, int, torch.cuda.Event, torch.cuda.Event]] = []

    def register(self, memory: torch.Tensor) -> None:
        """Page-lock one pool slot (shared memory) so copies into it are asynchronous DMA."""
        ptr = memory.data_ptr()
        error = torch.cuda.cudart().cudaHostRegister(ptr, memory.numel() * memory.element_size(), 0)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of {memory.numel() * memory.element_size()} bytes of the host pool "
                               f"failed (error {int(error)}); lower --ckpt-host-versions or --ckpt-host-budget-gb, "
                               "or raise the locked-memory limit (ulimit -l)")
        self._registered.append(ptr)

    def unregister(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered = []

    def begin(self) -> None:
        """On the training thread, at ``request``: mark the point of the training stream after
        step N; the copies start from there."""
        for event in self._issued:
            event.clear()
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(self.device))

    def copy(self, index: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.cuda.stream(self.stream):
            if index == 0 and self._ready is not None:
                self.stream.wait_event(self._ready)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            self._copied[index].record(self.stream)
        self._issued[index].set()

    def all_started(self) -> torch.cuda.Event:
        # Blocking: wait_landed (draining, at the end) sleeps in synchronize() instead of spinning
        # a core for the whole copy (a default event's synchronize busy-waits).
        landed = torch.cuda.Event(blocking=True)
        landed.record(self.stream)
        return landed

    def wait_landed(self, handle: torch.cuda.Event) -> None:
        handle.synchronize()

    def fence(self, index: int, tag: int) -> float | None:
        started = time.perf_counter()
        if self.on_block is not None and not self._issued[index].is_set():
            self.on_block()
        self._issued[index].wait()  # set: request enqueued every shard before this step began
        waited = time.perf_counter() - started
        event = self._copied[index]
        if event.query():
            return waited if waited > 1e-4 else None
        # The training stream waits on the GPU; the host goes on enqueuing work. How long the GPU
        # waited is measured with timing events around the wait, read once they have run.
        stream = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        self._pending.append((index, tag, before, after))
        return waited

    def device_waits(self) -> list[tuple[int, int, float]]:
        ran = [(p, p[3].query()) for p in self._pending]
        self._pending = [p for p, finished in ran if not finished]
        done = [p for p, finished in ran if finished]
        return [(index, tag, before.elapsed_time(after) / 1000) for index, tag, before, after in done]


def copier_for(arrays: dict[str, torch.Tensor], num_shards: int):
    """The copier for where the live arrays are (the one place this is decided)."""
    devices = {a.device for a in arrays.values()}
    if len(devices) != 1:
        raise ValueError(f"the checkpointed arrays are on several devices {sorted(map(str, devices))}; "
                         "they must all be on one")
    device = devices.pop()
    if device.type == "cuda":
        return CudaShardCopier(num_shards, device)
    if device.type == "cpu":
        return HostShardCopier(num_shards)
    raise ValueError(f"checkpointing arrays on {device.type} is not supported (cpu and cuda are)")
