"""The engine's CUDA path on a GPU: iteration-time overhead and blocked time of checkpointing every
iteration into the registered shared-memory pool, against no checkpointing, in one run.

A synthetic iteration: "forward and backward" are bf16 matrix products on the training stream
(``--compute-ms`` long), then an "optimizer step" updates three fp32 flat arrays (main weights
and two moments, ``--state-gb`` in all) shard by shard behind the engine's fences. Methods are
interleaved round by round; the table gives the median iteration time per method.

    python scripts/bench_engine_gpu.py --state-gb 3 --iters 20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from checkpointing.base import L1, L2, CheckpointConfig, Level, ParallelLayout  # noqa: E402
from checkpointing.engine import CheckpointEngine  # noqa: E402
from checkpointing.format import TensorPiece  # noqa: E402
from checkpointing.storage import ArraySpec, HostPool, list_segments  # noqa: E402
from cli.flags import add_flag  # noqa: E402


class FlatState:
    def __init__(self, numel: int, shards: int):
        self.arrays = {k: torch.randn(numel, device="cuda") for k in ("fp32_param", "exp_avg", "exp_avg_sq")}
        step = numel // shards
        self.shards = [(i * step, numel if i == shards - 1 else (i + 1) * step) for i in range(shards)]
        self.save_pieces = [TensorPiece(f"{k}", k, lo, (hi - lo,), (numel,), (lo,)) for k in self.arrays for lo, hi in self.shards]
        self.load_arrays, self.load_pieces = self.arrays, self.save_pieces
        self.layout = ParallelLayout(tensor_parallel=1, pipeline_parallel=1, data_parallel=1,
                                     distributed_optimizer=False, num_layers=1, bf16=False)
        self.zero_copy_refusal = "the state is on the GPU: its snapshots are device-to-host copies"
        self.legacy_padded_keys = frozenset()

    def capture_small_state(self, iteration):
        return {"common": {"iteration": iteration}}

    def step(self, engine):
        p, m, v = self.arrays["fp32_param"], self.arrays["exp_avg"], self.arrays["exp_avg_sq"]
        for index, (lo, hi) in enumerate(self.shards):
            if engine is not None:
                engine.fence(index)
            m[lo:hi].mul_(0.9).add_(p[lo:hi], alpha=0.1)
            v[lo:hi].mul_(0.999).addcmul_(m[lo:hi], m[lo:hi], value=0.001)
            p[lo:hi].addcdiv_(m[lo:hi], v[lo:hi].sqrt().add_(1e-8), value=-1e-4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-gb", type=float, default=3.0)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--compute-ms", type=float, default=150.0, help="forward+backward time to aim for")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    add_flag(parser, CheckpointConfig, "host_dir")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_engine_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    numel = int(args.state_gb * 1e9 / 12)
    state = FlatState(numel, args.shards)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def compute_once():
        torch.matmul(a, a)

    for _ in range(3):  # cuBLAS picks its kernel on the first calls
        compute_once()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        compute_once()
    torch.cuda.synchronize()
    per = (time.perf_counter() - t) / 10
    reps = max(1, round(args.compute_ms / 1000 / per))

    workdir = tempfile.mkdtemp(prefix="bench-gpu-")
    specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
    engines = {
        "L0 every iteration": [Level(L2, os.path.join(workdir, "l2"), None, None)],
        "L0 + L1 every 10th": [Level(L1, os.path.join(workdir, "l1"), 10, 1),
                               Level(L2, os.path.join(workdir, "l2"), None, None)],
    }
    for i, (method, levels) in enumerate(engines.items()):
        pool = HostPool(f"bench-gpu{i}", 0, specs, 2, None, args.host_dir)
        engines[method] = CheckpointEngine(state, pool, levels, dist.group.WORLD, lambda m: None)
    times: dict[str, list[float]] = {"none": [], **{m: [] for m in engines}}
    blocked: dict[str, list[float]] = {m: [] for m in engines}
    it = 0
    for _ in range(args.rounds):
        for method in times:
            engine = engines.get(method)
            train = torch.cuda.current_stream()
            for i in range(args.iters):
                # The training stream only: a device-wide sync would also wait for the copy stream.
                train.synchronize()
                started = time.perf_counter()
                for _ in range(reps):
                    compute_once()
                state.step(engine)
                if engine is not None:
                    it += 1
                    t = time.perf_counter()
                    engine.request(it)
                    blocked[method].append(time.perf_counter() - t)
                train.synchronize()
                if i >= 2:  # the first iterations of a method warm up
                    times[method].append(time.perf_counter() - started)
            if engine is not None:
                engine.wait_idle(drain=True)  # the next method starts with no flush in the background
    for engine in engines.values():
        engine.close(drain=True)
    for path in list_segments("bench-gpu", args.host_dir):
        os.unlink(path)
    gb = numel * 12 / 1e9
    base = statistics.median(times["none"])
    lines = [f"GPU: {torch.cuda.get_device_name()}; state {gb:.2f} GB in {args.shards} shards; "
             f"forward+backward {reps} bf16 8192^3 products ({reps * per * 1000:.0f} ms); "
             f"{args.rounds} rounds x {args.iters} iterations per method, interleaved; median iteration time",
             "", "| method | iteration | overhead | request blocked | per GB |", "|---|---|---|---|---|"]
    for method, ts in times.items():
        med = statistics.median(ts)
        b = statistics.median(blocked[method]) if method in blocked else 0.0
        lines.append(f"| {method} | {med * 1000:.1f} ms | {100 * (med / base - 1):+.1f}% | {b * 1000:.3f} ms | "
                     f"{b * 1000 / gb:.3f} ms/GB |")
    lines.append("")
    for method, engine in engines.items():
        st = engine.stats
        flushed = [f for f in st.flushes if f.error is None]
        lines.append(f"- {method}: {st.copies} snapshots, request to landed in host memory {st.copy_seconds / max(st.copies, 1) * 1000:.1f} ms "
                     f"on average; {st.fence_waits} fences reached an unfinished copy, GPU-side stall "
                     f"{st.stall_seconds * 1000:.1f} ms in all (request waits included), {st.backpressure_waits} requests "
                     f"waited for a slot; {len(flushed)} flushes" + (f" of {sum(f.seconds for f in flushed) / len(flushed):.2f} s "
                     f"each" if flushed else ""))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
