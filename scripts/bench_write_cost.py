#!/usr/bin/env python
"""What one flush's steps cost the machine, in CPU seconds per GB, and what disk writes cost
training running beside them.

- ``cpu`` part: each step on 1 GB in shared memory, alone: the copy into the pool, the xxh3
  checksum, a buffered write + fsync (what the writer did before), an ``O_DIRECT`` write + fsync,
  and this project's writer (``write_rank_file``: torch.save framing, checksums, ``O_DIRECT``).
  CPU = busy time of the whole machine from ``/proc/stat`` (it includes the kernel's writeback
  threads, which a process's own CPU time does not).
- ``interference`` part: a training step of the checkpoint bench's model, alone and with another
  process doing one of those steps on 1 GB once per iteration; interleaved rounds, ratios within
  one run.

    python scripts/bench_write_cost.py [--part cpu|interference|all] [--dir /tmp] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
GB = 1 << 30
CHUNK = 64 << 20


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


class Steps:
    """The steps of a flush on one GB of shared memory; each method does one step once."""

    def __init__(self, directory: str, tag: str):
        import torch

        self.directory = directory
        self.paths = [f"/dev/shm/bench-write-{tag}-{os.getpid()}-{i}" for i in range(2)]
        self.src = torch.from_file(self.paths[0], shared=True, size=GB, dtype=torch.uint8)
        self.dst = torch.from_file(self.paths[1], shared=True, size=GB, dtype=torch.uint8)
        self.src.copy_(torch.randint(0, 255, (GB,), dtype=torch.uint8))
        self.dst.fill_(0)
        self.file = os.path.join(directory, f"bench-write-{os.getpid()}.bin")

    def copy(self):
        """As the engine's CPU copier does: one memmove, on one thread."""
        from checkpointing.engine import copy_bytes

        copy_bytes(self.dst, self.src)

    def copy_two_threads(self):
        """``Tensor.copy_`` with an intra-op pool of 2 (what the copier did before)."""
        import torch

        torch.set_num_threads(2)
        try:
            self.dst.copy_(self.src)
        finally:
            torch.set_num_threads(1)

    def xxh3(self):
        import xxhash

        xxhash.xxh3_64(memoryview(self.src.numpy())).intdigest()

    def _write(self, flags: int) -> None:
        view = memoryview(self.src.numpy())
        fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags)
        try:
            for offset in range(0, GB, CHUNK):
                os.pwrite(fd, view[offset : offset + CHUNK], offset)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def buffered_write(self):
        self._write(0)

    def direct_write(self):
        self._write(os.O_DIRECT)

    def our_writer(self):
        import torch

        from checkpointing.format import TensorPiece, write_rank_file

        arrays = {"state": self.src.view(torch.float32)}
        n, pieces, start = GB // 4, [], 0
        while start < n:  # a few hundred pieces of the sizes a GPT's parameters have
            size = min(n - start, 1024 * (1024 + 64 * (len(pieces) % 4)))
            pieces.append(TensorPiece(f"p{len(pieces)}", "state", start, (size,), (size,), (0,)))
            start += size
        out = tempfile.mkdtemp(dir=self.directory)
        try:
            write_rank_file(out, 0, arrays, pieces, {"iteration": 1})
        finally:
            shutil.rmtree(out)

    def close(self):
        for path in self.paths + [self.file]:
            if os.path.exists(path):
                os.unlink(path)


STEPS = ("copy", "copy_two_threads", "xxh3", "buffered_write", "direct_write", "our_writer")


def part_cpu(directory: str, rounds: int) -> None:
    import torch

    torch.set_num_threads(1)
    steps = Steps(directory, "cpu")
    results = {name: [] for name in STEPS}
    try:
        for r in range(rounds + 1):  # the first round warms up (page cache, first touch), not kept
            for name in STEPS if r % 2 == 0 else STEPS[::-1]:
                busy, started = machine_busy_seconds(), time.perf_counter()
                getattr(steps, name)()
                if r:
                    results[name].append((machine_busy_seconds() - busy, time.perf_counter() - started))
    finally:
        steps.close()
    print(f"\n## CPU per GB, one step at a time, {rounds} rounds (medians), files in {directory}\n")
    print("| step | machine CPU s per GB | wall s |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name.replace('_', ' ')} | {statistics.median(v[0] for v in values):.2f} | "
              f"{statistics.median(v[1] for v in values):.2f} |")


def _background(name: str, directory: str, jobs, ready) -> None:
    steps = Steps(directory, "bg") if name != "none" else None
    ready.set()
    try:
        while jobs.get() is not None:
            if steps is not None:
                getattr(steps, name)()
    finally:
        if steps is not None:
            steps.close()


def part_interference(directory: str, rounds: int, iters: int = 6) -> None:
    import bench_checkpoint

    kinds = ("none", "copy", "direct_write", "buffered_write")
    trainer = bench_checkpoint.build_trainer()
    for _ in range(2):
        trainer.train_step()
    times = {k: [] for k in kinds}
    context = mp.get_context("spawn")  # not fork: copy-on-write faults would slow the trainer
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            jobs, ready = context.Queue(), context.Event()
            worker = context.Process(target=_background, args=(kind, directory, jobs, ready))
            worker.start()
            ready.wait()
            for i in range(iters + 1):
                jobs.put(1)  # one background step per training step
                started = time.perf_counter()
                trainer.train_step()
                if i:
                    times[kind].append(time.perf_counter() - started)
            jobs.put(None)
            worker.join()
            print(f"  round {r + 1}: {kind}: {' '.join(f'{t:.2f}' for t in times[kind][-iters:])}", flush=True)
    base = statistics.median(times["none"])
    print(f"\n## A training step with another process doing one step on 1 GB per iteration ({rounds} rounds x "
          f"{iters} iterations)\n")
    print("| beside training | median s/iteration | vs alone |\n|---|---|---|")
    for kind, values in times.items():
        print(f"| {kind.replace('_', ' ')} | {statistics.median(values):.3f} | {100 * (statistics.median(values) / base - 1):+.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("cpu", "interference", "all"), default="cpu")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (a disk, not tmpfs)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.part in ("cpu", "all"):
        part_cpu(args.dir, args.rounds)
    if args.part in ("interference", "all"):
        part_interference(args.dir, args.rounds)


if __name__ == "__main__":
    main()
