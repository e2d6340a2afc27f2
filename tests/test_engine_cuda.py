"""The engine's CUDA path (``checkpointing.engine.shard_copy.CudaShardCopier``) on a synthetic state on
the GPU: a dedicated copy stream into the registered shared-memory pool, one CUDA event per
shard as its fence. Skipped without CUDA; ``scripts/gpu_check.sh`` runs it on a GPU machine.

The optimizer step here starts right after ``request`` (no forward and backward in between),
so every fence is reached while the copies are still running: if a fence did not hold the
training stream, the step would overwrite a shard before its copy and the version would differ.
"""

import time

import pytest
import torch

from checkpointing.engine.shard_copy import CudaShardCopier, HostShardCopier, copier_for
from tests.helpers import make_engine, synthetic_layout

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHARDS = 4


class CudaState:
    """Two flat fp32 arrays on the GPU in ``SHARDS`` shards (64 MiB per shard and array)."""

    def __init__(self, shard_numel: int = 1 << 24):
        from checkpointing.format.items import TensorPiece

        n = SHARDS * shard_numel
        g = torch.Generator(device="cuda").manual_seed(0)
        self.arrays = {name: torch.randn(n, generator=g, device="cuda") for name in ("a", "b")}
        self.shards = [(i * shard_numel, (i + 1) * shard_numel) for i in range(SHARDS)]
        self.save_pieces = [TensorPiece(k, k, lo, (hi - lo,), (n,), (lo,)) for k in self.arrays for lo, hi in self.shards]
        self.load_arrays, self.load_pieces = self.arrays, self.save_pieces
        self.layout = synthetic_layout()
        self.zero_copy_refusal = "its arrays are on the GPU"

    def capture_small_state(self, iteration):
        return {"common": {"iteration": iteration}}

    def optimizer_step(self, engine):
        for index, (lo, hi) in enumerate(self.shards):
            engine.fence(index)
            for array in self.arrays.values():
                array[lo:hi].mul_(0.5).add_(1.0)


def test_the_device_picks_the_copier():
    assert isinstance(copier_for({"a": torch.zeros(4)}, 2), HostShardCopier)
    assert isinstance(copier_for({"a": torch.zeros(4, device="cuda")}, 2), CudaShardCopier)
    with pytest.raises(ValueError, match="several devices"):
        copier_for({"a": torch.zeros(4), "b": torch.zeros(4, device="cuda")}, 2)


def test_every_version_equals_the_state_after_its_step_with_gpu_fences(tmp_path, single_process_group):
    from checkpointing.format.reader import CheckpointReader

    state = CudaState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=1)
    expected = {}
    blocked = []
    for it in range(1, 7):
        state.optimizer_step(engine)
        expected[it] = {k: v.cpu() for k, v in state.arrays.items()}  # synchronous reference copy
        started = time.perf_counter()
        engine.request(it)
        blocked.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    engine.close(drain=True)
    flushed = [f.version for f in engine.stats.flushes if f.error is None]
    assert 6 in flushed
    for it in flushed:
        reader = CheckpointReader(str(tmp_path / "l2" / f"iter_{it:07d}"))
        loaded = {k: torch.empty_like(v) for k, v in expected[it].items()}
        reader.read_pieces(state.save_pieces, loaded)
        for k in loaded:
            assert torch.equal(loaded[k], expected[it][k]), f"version {it}, array {k}"
    assert engine.stats.fence_waits > 0, "the step right after request must reach unfinished copies"
    print(f"fence waits {engine.stats.fence_waits}, GPU-side stall {engine.stats.stall_seconds * 1000:.1f} ms, "
          f"request blocked {[round(b * 1000, 2) for b in blocked]} ms")


def test_request_returns_before_the_copy_is_done(tmp_path, single_process_group):
    state = CudaState()
    engine, _ = make_engine(tmp_path, single_process_group, state, slots=2, interval=10**6)
    state.optimizer_step(engine)
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.request(1)
    blocked = time.perf_counter() - started
    engine.wait_idle(drain=False)
    copy = engine.stats.last_copy_seconds
    engine.close(drain=True)
    nbytes = sum(a.numel() * a.element_size() for a in state.arrays.values())
    print(f"request blocked {blocked * 1000:.2f} ms for {nbytes / 2**30:.2f} GiB; the copy took {copy * 1000:.1f} ms "
          f"({nbytes / copy / 1e9:.1f} GB/s into registered shared memory)")
    assert blocked < copy / 4, (blocked, copy)
