"""How a version's bytes get into a pool slot: copied from the live arrays, or written there by
the step itself (zero-copy). Both run on the training thread; neither starts a thread.

- :class:`CopiedSnapshots`: at ``request`` the live arrays are copied into the slot. On a CPU the
  copy is done then and there (one ``memmove`` per array and shard, the GIL released); on CUDA
  each shard's device-to-host copy is *enqueued* on a copy stream (microseconds per shard), a
  fence makes the training stream wait for its shard's event, and the slot has landed once the
  last event has completed (``event.query()``, polled at fences and requests: no thread waits).
- Zero-copy snapshots need no object here: the optimizer step writes the slot
  (``CheckpointEngine.begin_step``), and a fence waits for the flusher's progress instead.
"""

from __future__ import annotations

import time

import torch

from checkpointing.engine.shard_copy import copier_for


class CopiedSnapshots:
    def __init__(self, arrays: dict[str, torch.Tensor], shards: list[tuple[int, int]], slots: list[dict[str, torch.Tensor]],
                 memories: list[torch.Tensor], tracer):
        self.shards = shards
        self.tracer = tracer
        self.copier = copier_for(arrays, len(shards))
        for memory in memories:
            self.copier.register(memory)
        self.synchronous = not hasattr(self.copier, "stream")
        """The copy is complete when :meth:`start` returns (a CPU)."""

    def start(self, live: dict[str, torch.Tensor], slot: dict[str, torch.Tensor], version: int):
        """Copy (CPU) or enqueue the copy of (CUDA) every shard; returns a handle for :meth:`landed`."""
        self.copier.begin()
        for index, (lo, hi) in enumerate(self.shards):
            started = time.perf_counter_ns()
            self.copier.copy(index, [(slot[name][lo:hi], array[lo:hi]) for name, array in live.items()])
            self.tracer.complete(f"copy shard {index}", "ckpt", started, time.perf_counter_ns(), iteration=version)
        return self.copier.all_started()

    def landed(self, handle) -> bool:
        return handle is None or handle.query()

    def wait_landed(self, handle) -> None:
        self.copier.wait_landed(handle)

    def fence(self, index: int, iteration: int) -> float | None:
        return self.copier.fence(index, iteration)

    def device_waits(self):
        return self.copier.device_waits()

    def close(self) -> None:
        self.copier.unregister()
