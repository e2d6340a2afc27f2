"""The checkpoint engine's counters in TensorBoard, per iteration, over all ranks.

Each iteration every rank contributes one small vector (stall, fence waits, copy time, pool
occupancy, the CPU time the flusher process used and the time the training thread spent in the
engine's request and fences since the last iteration, bytes and seconds of
the flushes finished since the last iteration, stall per shard);
one all-gather on a gloo group of its own brings them to the logging rank, which writes the
maximum stall and the rank it came from, sums of bytes, bandwidth per level and a histogram of
stall per shard, grouped on one page by TensorBoard's custom scalars (:data:`CUSTOM_SCALARS`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from checkpointing.base import DISK_LEVELS

FIXED = 6 + 2 * len(DISK_LEVELS)  # stall, fence waits, copy ms, busy slots, flusher CPU ms, (bytes, seconds) per level, training-thread ms

CUSTOM_SCALARS = {
    "Checkpoint": {
        "stall (ms, max over ranks)": ["Multiline", ["checkpoint/stall-ms"]],
        "rank with the max stall": ["Multiline", ["checkpoint/stall-rank"]],
        "fence waits": ["Multiline", ["checkpoint/fence-waits"]],
        "snapshot copy (ms)": ["Multiline", ["checkpoint/snapshot-copy-ms"]],
        "host pool occupancy": ["Multiline", ["checkpoint/pool-occupancy"]],
        "flusher processes' CPU (ms, max over ranks)": ["Multiline", ["checkpoint/flusher-cpu-ms"]],
        "training thread in request and fences (ms, max over ranks)": ["Multiline", ["checkpoint/training-thread-ms"]],
        "flush bandwidth (GB/s)": ["Multiline", [f"checkpoint/flush-GBps-{lv}" for lv in DISK_LEVELS]],
        "flush time (s)": ["Multiline", [f"checkpoint/flush-seconds-{lv}" for lv in DISK_LEVELS]],
        "bytes flushed": ["Multiline", [f"checkpoint/bytes-{lv}" for lv in DISK_LEVELS]],
        "iteration time (s)": ["Multiline", ["iteration-time"]],
    }
}


class CheckpointTelemetry:
    """Collects the engine's per-iteration counters on every rank; writes on the logging rank.

    ``group``: a gloo group over every rank, used by nothing else. The counters are CPU tensors:
    on GPUs the default group is NCCL, which cannot gather them, and the checkpoint manager's gloo
    group serves its own agreements (the flusher processes have a group of their own).
    """

    def __init__(self, engine, writer, group):
        if group is None or dist.get_backend(group) != "gloo":
            raise ValueError("CheckpointTelemetry needs a gloo group of its own (dist.new_group(backend='gloo')), "
                             f"got {'the default group' if group is None else dist.get_backend(group)}")
        self.engine = engine
        self.writer = writer
        self.group = group
        self.shards = len(engine.state.shards)
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, torch.tensor([self.shards]), group=group)
        self.max_shards = int(max(c.item() for c in counts))
        self._flush_cursor = 0
        self._stall_seen = 0.0
        self._cpu_seen = 0.0
        self._own_seen = 0.0
        self._fences_seen = 0
        self._shard_seen = [0.0] * self.shards
        if writer is not None:
            writer.add_custom_scalars(CUSTOM_SCALARS)

    def local_vector(self) -> torch.Tensor:
        s = self.engine.stats
        vector = torch.zeros(FIXED + self.max_shards, dtype=torch.float64)
        vector[0] = 1000 * (s.stall_seconds - self._stall_seen)
        vector[1] = s.fence_waits - self._fences_seen
        vector[2] = 1000 * s.last_copy_seconds
        vector[3] = self.engine.pool_busy() / len(self.engine.pool.slots)
        cpu = s.cpu_seconds
        vector[4] = 1000 * (cpu - self._cpu_seen)
        self._cpu_seen = cpu
        own = s.training_thread_seconds
        vector[FIXED - 1] = 1000 * (own - self._own_seen)
        self._own_seen = own
        flushes = s.flushes[self._flush_cursor :]
        for i, level in enumerate(DISK_LEVELS):
            done = [f for f in flushes if f.level == level and f.error is None]
            vector[5 + 2 * i] = sum(f.bytes for f in done)
            vector[6 + 2 * i] = sum(f.seconds for f in done)
        for k in range(self.shards):
            vector[FIXED + k] = 1000 * (s.stall_by_shard[k] - self._shard_seen[k])
        self._flush_cursor += len(flushes)
        self._stall_seen, self._fences_seen = s.stall_seconds, s.fence_waits
        self._shard_seen = list(s.stall_by_shard)
        return vector

    def after_step(self, iteration: int) -> None:
        """Every rank calls it after the checkpoint request of ``iteration``."""
        mine = self.local_vector()
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, mine, group=self.group)
        if self.writer is None:
            return
        table = torch.stack(gathered)
        w = self.writer
        stall = table[:, 0]
        w.add_scalar("checkpoint/stall-ms", stall.max().item(), iteration)
        w.add_scalar("checkpoint/stall-rank", int(stall.argmax().item()), iteration)
        w.add_scalar("checkpoint/fence-waits", table[:, 1].sum().item(), iteration)
        w.add_scalar("checkpoint/snapshot-copy-ms", table[:, 2].max().item(), iteration)
        w.add_scalar("checkpoint/pool-occupancy", table[:, 3].max().item(), iteration)
        w.add_scalar("checkpoint/flusher-cpu-ms", table[:, 4].max().item(), iteration)
        w.add_scalar("checkpoint/training-thread-ms", table[:, FIXED - 1].max().item(), iteration)
        for i, level in enumerate(DISK_LEVELS):
            nbytes, seconds = table[:, 5 + 2 * i].sum().item(), table[:, 6 + 2 * i].max().item()
            if nbytes > 0:
                w.add_scalar(f"checkpoint/bytes-{level}", nbytes, iteration)
                w.add_scalar(f"checkpoint/flush-seconds-{level}", seconds, iteration)
                w.add_scalar(f"checkpoint/flush-GBps-{level}", nbytes / max(seconds, 1e-9) / 1e9, iteration)
        w.add_histogram("checkpoint/stall-per-shard-ms", table[:, FIXED:].flatten(), iteration)
