"""torchrun worker: two ranks checkpoint every iteration to a slow L2, at different paces.

    torchrun --nproc-per-node 2 tests/workers/engine_skip_worker.py OUT_DIR

Each rank's flush is slower than its iterations, so ``request`` takes the slots of superseded
queued versions (orphaning their jobs) at moments that differ between the ranks. Rank 0 then
checks that both ranks flushed and skipped the same versions, that no request waited, and that
every committed version holds, bit for bit, both ranks' state after that step. Prints ``OK``.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpointing.engine import CheckpointEngine, Level  # noqa: E402
from checkpointing.host_pool import ArraySpec, HostPool  # noqa: E402
from checkpointing.items import TensorPiece  # noqa: E402
from checkpointing.reader import CheckpointReader  # noqa: E402

N, SHARDS, VERSIONS = 1 << 15, 4, 10


def values(iteration: int, rank: int, name: str) -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32) * 1e-3 + iteration * 100 + rank + (0.5 if name == "b" else 0.0)


class TwoRankState:
    def __init__(self, rank: int):
        self.rank = rank
        self.arrays = {name: values(0, rank, name) for name in ("a", "b")}
        size = N // SHARDS
        self.shards = [(i * size, (i + 1) * size) for i in range(SHARDS)]
        self.save_pieces = [TensorPiece(name, name, lo, (hi - lo,), (2 * N,), (rank * N + lo,))
                            for name in self.arrays for lo, hi in self.shards]
        self.load_arrays, self.load_pieces = self.arrays, self.save_pieces

    def capture_objects(self, iteration):
        return {"common": {"iteration": iteration}} if self.rank == 0 else {f"rank{self.rank}": iteration}

    def step(self, engine, iteration):
        for index, (lo, hi) in enumerate(self.shards):
            engine.fence(index)
            for name, array in self.arrays.items():
                array[lo:hi] = values(iteration, self.rank, name)[lo:hi]


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = TwoRankState(rank)
    specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
    pool = HostPool(f"test-skip-{os.path.basename(out)}", rank, specs, 3, None)
    engine = CheckpointEngine(state, pool, [Level("L2", os.path.join(out, "l2"), 1, None)],
                              dist.new_group(backend="gloo"), print)
    engine.flush_hook = lambda level, version: time.sleep(0.3)
    for it in range(1, VERSIONS + 1):
        state.step(engine, it)
        engine.request(it)
        time.sleep(0.03 if rank == 0 else 0.08)  # the ranks reach each request at other times
    engine.close(drain=True)
    flushed = [f.version for f in engine.stats.flushes if f.error is None]
    mine = (flushed, engine.stats.skipped["L2"], engine.stats.backpressure_waits)
    every = [None, None]
    dist.all_gather_object(every, mine)
    for slot in pool.slots:
        for path in (slot.path, slot.meta_path):
            if os.path.exists(path):
                os.unlink(path)
    if rank == 0:
        (flushed0, skipped0, waits0), (flushed1, skipped1, waits1) = every
        assert flushed0 == flushed1 and skipped0 == skipped1, every
        assert len(flushed0) + skipped0 == VERSIONS and skipped0 > 0 and VERSIONS in flushed0, every
        assert waits0 == 0 and waits1 == 0, f"a slow disk made a request wait: {every}"
        for it in flushed0:
            reader = CheckpointReader(os.path.join(out, "l2", f"iter_{it:07d}"))
            whole = {name: torch.empty(2 * N) for name in ("a", "b")}
            reader.read_pieces([TensorPiece(name, name, 0, (2 * N,), (2 * N,), (0,)) for name in whole], whole)
            for name, tensor in whole.items():
                expected = torch.cat([values(it, r, name) for r in range(2)])
                assert torch.equal(tensor, expected), f"version {it}, array {name}"
        print(f"OK flushed {flushed0}, skipped {skipped0}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
