"""torchrun worker: two ranks checkpoint every iteration to a slow L2, at different paces.

    torchrun --nproc-per-node 2 tests/workers/engine_skip_worker.py OUT_DIR

Each rank's disk (its flusher's: ``GPT_CKPT_DISK_GATE``) is stuck until that rank has requested
four versions, and every flush is slower than its iterations (``GPT_CKPT_DELAY``), so ``request`` takes the slots of superseded
queued versions (orphaning their jobs) at moments that differ between the ranks. Rank 0 then
checks, from both engines' records, that both ranks flushed and skipped the same versions, that
some were skipped, that no request waited, and that every committed version holds, bit for bit,
both ranks' state after that step. Prints ``OK``.

Nothing here depends on the machine's speed: the stuck disk makes skipping certain (the fourth
request finds every slot pinned and a slot free only by superseding a queued version), and each
request is made once the previous version is in L0 (a copy still landing is not a slow disk).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpointing.base.levels import Level  # noqa: E402
from checkpointing.engine.checkpoint_engine import CheckpointEngine  # noqa: E402
from checkpointing.format.items import TensorPiece  # noqa: E402
from checkpointing.format.reader import CheckpointReader  # noqa: E402
from checkpointing.storage.host_pool import ArraySpec, HostPool  # noqa: E402
from tests.helpers import SyntheticState  # noqa: E402

SHARD_NUMEL, SLOTS, VERSIONS = 1 << 13, 3, 10


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gate = os.path.join(out, f"disk-free-r{rank}")
    os.environ["GPT_CKPT_DISK_GATE"] = gate  # read by this rank's flusher process, started below
    os.environ["GPT_CKPT_DELAY"] = "flush:300"
    shape = {"shard_numel": SHARD_NUMEL, "world_size": 2}
    state = SyntheticState(rank=rank, **shape)
    specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
    pool = HostPool(f"test-skip-{os.path.basename(out)}", rank, specs, SLOTS, None)
    engine = CheckpointEngine(state, pool, [Level("L2", os.path.join(out, "l2"), 1, None)],
                              dist.new_group(backend="gloo"), print)
    for it in range(1, VERSIONS + 1):
        state.optimizer_step(engine)
        while engine.stats.copies < it - 1:  # the previous version is in L0
            engine.active()
            time.sleep(0.001)
        engine.request(it)
        if it == SLOTS + 1:
            open(gate, "w").close()
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
        n = 2 * state.arrays["a"].numel()  # the global tensors: both ranks' arrays
        for it in flushed0:
            reader = CheckpointReader(os.path.join(out, "l2", f"iter_{it:07d}"))
            whole = {name: torch.empty(n) for name in ("a", "b")}
            reader.read_pieces([TensorPiece(name, name, 0, (n,), (n,), (0,)) for name in whole], whole)
            for name, tensor in whole.items():
                expected = torch.cat([SyntheticState.after_steps(it, rank=r, **shape).arrays[name] for r in range(2)])
                assert torch.equal(tensor, expected), f"version {it}, array {name}"
        print(f"OK flushed {flushed0}, skipped {skipped0}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
