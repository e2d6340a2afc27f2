#!/usr/bin/env python
"""What checkpointing costs training on this machine, measured as ratios within one run.

1 process, a GPT whose checkpointed training state (fp32 main weights and both Adam moments) is
about 1 GB. Two parts:

- ``format``: one synchronous save (``checkpointing.commit``) and one load (resharding reader,
  checksums verified) next to the machine's raw write+fsync and cold read of the same bytes.
- ``flush-cost``: the CPU and wall time of one flush of the state against the raw ``O_DIRECT``
  write the CheckFreq-style row makes, and of the xxh3 checksums alone: what the engine's extra
  work per version costs.
- ``restore``: a resume's read of one committed checkpoint (issue 18), as a user's resume does it:
  in a fresh process whose trainer is built (its live arrays allocated and initialised), the
  optimizer state read through ``CheckpointReader`` (checksums verified) straight into them; next
  to a raw sequential ``O_DIRECT`` read of the same data files (as ``dd iflag=direct bs=64M``),
  the page cache dropped before each, in interleaved rounds. ``--reader-file`` adds the
  ``CheckpointReader`` of another file (e.g. the one before issue 18) to each round.
- ``overhead``: interleaved rounds of K iterations per method, checkpointing every iteration:
  none; this engine with L0 every iteration + L1 every 10th; this engine every iteration to
  disk (L2), as fast as the disk goes and with ``--ckpt-write-rate-limit``; torch.save + fsync;
  DCP save; DCP async_save with a thread and with a process. Overhead = median iteration time /
  median without checkpointing - 1; blocked = time the training thread spent in checkpoint calls
  and fences, per checkpoint. Each round's line also gives the CPU seconds per iteration of
  each thread of the training process (training, OpenMP workers) and the flusher process's CPU.

- ``host-bound``: the product CLI (``pretrain_gpt.py``) on a model whose iteration is Python and op
  dispatch (16 layers x 128, seq 64, 8 micro-batches of 1), one OpenMP thread, so the second core
  is free for the flusher process: none, L0 every iteration + L1 every 10th, every iteration to
  disk; interleaved rounds, time between consecutive iteration lines, with the run's summary.

Each method of a round runs in a process of its own, so that each can have its own OpenMP wait
policy (``method@passive``); overheads are against ``none`` with OpenMP's default.

    python scripts/bench_checkpoint.py [--part format|flush-cost|restore|overhead|host-bound|all] [--rounds 2] [--iters 6] [--methods ...]
        [--reader-file FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = ("--num-layers 6 --hidden-size 1024 --num-attention-heads 16 --seq-length 128 --max-position-embeddings 128 "
         "--vocab-size 8192 --mock-data --micro-batch-size 1 --global-batch-size 2 --train-iters 100000 --lr 1e-4 "
         "--hidden-dropout 0 --attention-dropout 0 --optimizer-shard-size-mb 64").split()


def build_trainer():
    import torch

    from models.cpu_compat import apply_cpu_compat
    from trainer.arguments import parse_job_config
    from trainer.device import select_device
    from trainer.training import Trainer, init_distributed

    torch.set_num_threads(os.cpu_count() or 1)
    job = parse_job_config(MODEL, world_size=1)
    device = select_device()
    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = job.parallel.initialize()
    return Trainer(job, device, groups)


def state_bytes(trainer) -> int:
    opt = trainer.optimizer
    return sum(t.numel() * 4 for t in (opt.main_params, opt.exp_avg, opt.exp_avg_sq))


def raw_bandwidth(directory: str, nbytes: int) -> tuple[float, float]:
    """(write+fsync GB/s, cold read GB/s) of one file of ``nbytes``, 64 MiB writes."""
    import numpy as np

    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    path = os.path.join(directory, "raw.bin")
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    write = nbytes / (time.perf_counter() - started) / 1e9
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    read = nbytes / (time.perf_counter() - started) / 1e9
    os.unlink(path)
    return write, read


def drop_cache(directory: str) -> None:
    for dirpath, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def part_format(trainer, workdir: str) -> None:
    import torch.distributed as dist

    from checkpointing.commit import save_and_commit
    from checkpointing.levels import sync_level
    from checkpointing.discovery import iteration_dir
    from checkpointing.reader import CheckpointReader
    from trainer.checkpoint_state import TrainerCheckpointState

    state = TrainerCheckpointState(trainer)
    group = dist.new_group(backend="gloo")
    nbytes = state_bytes(trainer)
    write_bw, read_bw = raw_bandwidth(workdir, nbytes)
    root = os.path.join(workdir, "format")
    result = save_and_commit(sync_level(root), 1, state.arrays, state.save_pieces, state.capture_objects(1), state.layout, group)
    directory = iteration_dir(root, 1)
    drop_cache(directory)
    started = time.perf_counter()
    CheckpointReader(directory).read_pieces(state.load_pieces, state.load_arrays)
    load_s = time.perf_counter() - started
    print(f"\n## Format: {nbytes / 1e9:.2f} GB of training state, 1 process\n")
    print("| what | seconds | GB/s | ratio to raw |\n|---|---|---|---|")
    print(f"| raw write + fsync of {nbytes / 1e9:.2f} GB | {nbytes / 1e9 / write_bw:.2f} | {write_bw:.2f} | 1.00 |")
    print(f"| our save (serialise, checksum, write, fsync, commit) | {result.seconds:.2f} | {nbytes / 1e9 / result.seconds:.2f} | "
          f"{(nbytes / 1e9 / result.seconds) / write_bw:.2f} |")
    print(f"| raw cold read | {nbytes / 1e9 / read_bw:.2f} | {read_bw:.2f} | 1.00 |")
    print(f"| our load (cold, checksums verified, resharding reader) | {load_s:.2f} | {nbytes / 1e9 / load_s:.2f} | "
          f"{(nbytes / 1e9 / load_s) / read_bw:.2f} |")
    shutil.rmtree(root)


def part_flush_cost(trainer, workdir: str, rounds: int) -> None:
    """What one flush of the state costs the CPU, against the raw write the CheckFreq-style row
    makes (one ``O_DIRECT`` write of page-aligned memory, fsync): the engine's extra work per
    version (xxh3 checksums, per-piece framing, the commit's metadata and fsyncs), timed on this
    thread (thread CPU clock) and by the wall clock, in interleaved rounds, medians."""
    import mmap

    import torch
    import torch.distributed as dist
    import xxhash

    from checkpointing.commit import save_and_commit
    from checkpointing.levels import sync_level
    from trainer.checkpoint_state import TrainerCheckpointState

    state = TrainerCheckpointState(trainer)
    group = dist.new_group(backend="gloo")
    nbytes = state_bytes(trainer)
    memory = mmap.mmap(-1, -(-nbytes // 4096) * 4096)  # page-aligned, as O_DIRECT needs
    flat = torch.frombuffer(memory, dtype=torch.uint8, count=nbytes)
    at = 0
    for array in flat_state(trainer).values():
        flat[at : at + array.numel() * 4].copy_(array.view(torch.uint8))
        at += array.numel() * 4
    raw = memoryview(memory)[: nbytes // 4096 * 4096]

    def checksums():
        xxhash.xxh3_64(raw).intdigest()

    def raw_write():
        fd = os.open(os.path.join(workdir, "raw-direct.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)

    def our_save(version=[0]):
        version[0] += 1
        root = os.path.join(workdir, "flush-cost")
        save_and_commit(sync_level(root, 1), version[0], state.arrays, state.save_pieces,
                        state.capture_objects(version[0]), state.layout, group)

    steps = {"xxh3-64 checksums of the state (no I/O)": checksums, "raw O_DIRECT write + fsync (CheckFreq-style)": raw_write,
             "our flush: serialise, checksum, O_DIRECT write, fsync, commit": our_save}
    cpu = {k: [] for k in steps}
    wall = {k: [] for k in steps}
    for r in range(rounds):
        for name, fn in (steps.items() if r % 2 == 0 else reversed(steps.items())):
            c, w = time.thread_time(), time.perf_counter()
            fn()
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - w)
    print(f"\n## Flush cost: {nbytes / 1e9:.2f} GB of state, {rounds} interleaved rounds, medians\n")
    print("| what | CPU s (this thread) | wall s | CPU s per GB |\n|---|---|---|---|")
    for name in steps:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"| {name} | {c:.3f} | {w:.2f} | {c / (nbytes / 1e9):.3f} |")
    extra = statistics.median(cpu[list(steps)[2]]) - statistics.median(cpu[list(steps)[1]])
    print(f"\nThe engine's extra CPU per version over the raw write: {extra:.3f} s, of which checksums "
          f"{statistics.median(cpu[list(steps)[0]]):.3f} s.")
    os.unlink(os.path.join(workdir, "raw-direct.bin"))
    shutil.rmtree(os.path.join(workdir, "flush-cost"))


RAW_READ_BYTES = 64 << 20
"""Bytes per read of the raw sequential reads (``dd iflag=direct bs=64M``)."""


def raw_direct_read(paths: list[str], huge_pages: bool) -> tuple[int, float]:
    """(bytes, seconds) of reading ``paths`` front to back with ``O_DIRECT`` in 64 MiB reads into
    one reused buffer: what the disk gives a reader that does nothing with the bytes. With
    ``huge_pages`` the buffer is in 2 MiB pages (``MADV_HUGEPAGE``), as the reader's are: on the
    2-core VM an ``O_DIRECT`` read into them went about 2.5 times as fast as into 4 KiB pages,
    which is what ``dd``'s buffer is in."""
    import mmap

    buffer = mmap.mmap(-1, RAW_READ_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    else:
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    buffer.write(bytes(RAW_READ_BYTES))  # fault it in before the clock starts
    total = 0
    started = time.perf_counter()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # a file system without O_DIRECT: through the page cache (dropped before)
            fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                n = os.preadv(fd, [buffer], offset)
                offset += n
                if n < RAW_READ_BYTES:
                    break
        finally:
            os.close(fd)
        total += offset
    seconds = time.perf_counter() - started
    buffer.close()
    return total, seconds


def dd_read(paths: list[str]) -> tuple[int, float] | None:
    """(bytes, seconds) of ``dd iflag=direct bs=64M`` over ``paths`` (None without ``dd``)."""
    import subprocess

    if shutil.which("dd") is None:
        return None
    started = time.perf_counter()
    for path in paths:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=64M"], check=True,
                       capture_output=True)
    return sum(os.path.getsize(p) for p in paths), time.perf_counter() - started


def optimizer_pieces(state):
    from checkpointing import keys

    return [p for p in state.load_pieces if keys.is_optimizer_key(p.key)]


def pieces_digest(pieces, arrays) -> int:
    """xxh3-64 over the bytes of ``pieces`` of ``arrays``, in order: the restored state equals the
    saved one."""
    import torch
    import xxhash

    digest = xxhash.xxh3_64()
    for piece in pieces:
        digest.update(piece.view(arrays).contiguous().view(-1).view(torch.uint8).numpy())
    return digest.intdigest()


def child_restore(directory: str, reader_file: str | None) -> None:
    """A resume's read of ``directory`` in this fresh process: build the trainer (its arrays
    allocated and initialised, as a resume finds them), then time the reader over the optimizer
    state (main weights, both moments) and the ``common`` item, checksums verified; print JSON.
    ``gc``: seconds of garbage collection during the read (a full pass over the trainer's heap
    costs about 0.2 s here; the allocations of the read often trigger one that is due)."""
    import gc
    import json

    from checkpointing import keys
    from trainer.checkpoint_state import TrainerCheckpointState

    if reader_file:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_reader_under_test", reader_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reader_class = module.CheckpointReader
    else:
        from checkpointing.reader import CheckpointReader as reader_class
    trainer = build_trainer()
    state = TrainerCheckpointState(trainer)
    pieces = optimizer_pieces(state)
    arrays = state.load_arrays
    gc_seconds = [0.0, 0.0]  # total, start of the collection under way

    def collection(phase, info):
        if phase == "start":
            gc_seconds[1] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_seconds[1]

    cpu_before = time.process_time()
    started = time.perf_counter()
    gc.callbacks.append(collection)
    reader = reader_class(directory)
    nbytes = reader.read_pieces(pieces, arrays, reader.padded_rows_allowed(state.legacy_padded_keys))
    reader.read_object(keys.COMMON)
    gc.callbacks.remove(collection)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    print(json.dumps({"bytes": nbytes, "seconds": seconds, "cpu": cpu, "gc": gc_seconds[0],
                      "digest": pieces_digest(pieces, arrays)}), flush=True)


def _child_result(proc, what: str) -> dict:
    """The JSON line a bench child printed last. A child that measured, then died on its way out
    (once: "terminate called without an active exception" at exit) keeps its numbers, said."""
    import json

    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        print(f"  ({what} exited with {proc.returncode} after printing its result: {last})", flush=True)
    return json.loads(lines[-1])


def run_restore_child(directory: str, reader_file: str | None) -> dict:
    import subprocess

    env = dict(os.environ)
    for variable in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a job of its own
        env.pop(variable, None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-restore", directory]
    if reader_file:
        cmd += ["--reader-file", reader_file]
    return _child_result(subprocess.run(cmd, env=env, capture_output=True, text=True), "restore child")


def part_restore(trainer, workdir: str, rounds: int, reader_file: str | None) -> None:
    """Save ``trainer``'s state once; then ``rounds`` interleaved rounds of raw ``O_DIRECT`` reads
    of its data files (``dd``, and into huge pages) and a resume's read through the reader (each
    in a fresh process), the page cache dropped before each. Ratios: the reader's GB/s over each
    raw read's of the same round."""
    import torch.distributed as dist

    from checkpointing.commit import save_and_commit
    from checkpointing.discovery import iteration_dir
    from checkpointing.levels import sync_level
    from trainer.checkpoint_state import TrainerCheckpointState

    state = TrainerCheckpointState(trainer)
    root = os.path.join(workdir, "restore")
    save_and_commit(sync_level(root), 1, state.arrays, state.save_pieces, state.capture_objects(1), state.layout,
                    dist.new_group(backend="gloo"))
    expected = pieces_digest(optimizer_pieces(state), state.load_arrays)
    directory = iteration_dir(root, 1)
    files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".distcp"))
    raws = {"dd": "dd iflag=direct bs=64M (buffer in 4 KiB pages)",
            "huge": "O_DIRECT, 64 MiB reads into a buffer in huge pages (the fastest raw read here)"}
    readers = {"this reader": None}
    if reader_file:
        readers[f"the reader of {reader_file}"] = reader_file
    rates: dict[str, list[float]] = {name: [] for name in [*raws, *readers]}
    details: dict[str, list[tuple[float, float, float]]] = {name: [] for name in readers}
    for r in range(rounds):
        order = [*raws, *readers]
        for what in (order if r % 2 == 0 else order[::-1]):
            drop_cache(directory)
            if what in raws:
                result = dd_read(files) if what == "dd" else raw_direct_read(files, huge_pages=True)
                rates[what].append(result[0] / result[1] / 1e9 if result else float("nan"))
                continue
            out = run_restore_child(directory, readers[what])
            if out["digest"] != expected:
                raise RuntimeError(f"{what}: the restored state differs from the saved one")
            rates[what].append(out["bytes"] / out["seconds"] / 1e9)
            details[what].append((out["seconds"], out["cpu"], out["gc"]))
        print(f"  round {r + 1}: " + "; ".join(
            f"{name} {rates[name][-1]:.2f} GB/s" + (f" ({details[name][-1][0]:.2f} s, {details[name][-1][1]:.2f} s CPU, "
                                                   f"{details[name][-1][2]:.2f} s GC)" if name in details else "")
            for name in order), flush=True)
    nbytes = sum(os.path.getsize(f) for f in files)
    print(f"\n## Restore: a resume's read of {nbytes / 1e9:.2f} GB ({len(files)} data file{'s' if len(files) > 1 else ''}), "
          f"1 process, {rounds} interleaved rounds, page cache dropped before each read\n")
    print("| what | median GB/s | median s | median CPU s | median GC s | ratio to dd, per round | "
          "ratio to the huge-page read, per round | median ratio to dd / to huge-page read |\n|---|---|---|---|---|---|---|---|")
    for name, label in raws.items():
        rate = statistics.median(rates[name])
        print(f"| raw: {label} | {rate:.2f} | {nbytes / 1e9 / rate:.2f} | - | - | - | - | - |")
    for name, values in details.items():
        to_dd = [a / b for a, b in zip(rates[name], rates["dd"])]
        to_huge = [a / b for a, b in zip(rates[name], rates["huge"])]
        print(f"| restore through {name} (fresh process, checksums verified, into the live arrays) | "
              f"{statistics.median(rates[name]):.2f} | {statistics.median(v[0] for v in values):.2f} | "
              f"{statistics.median(v[1] for v in values):.2f} | {statistics.median(v[2] for v in values):.2f} | "
              f"{' '.join(f'{x:.2f}' for x in to_dd)} | {' '.join(f'{x:.2f}' for x in to_huge)} | "
              f"{statistics.median(to_dd):.2f} / {statistics.median(to_huge):.2f} |")
    shutil.rmtree(root)


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

        from checkpointing.engine import CheckpointEngine
        from checkpointing.levels import Level
        from checkpointing.host_pool import ArraySpec, HostPool
        from trainer.checkpoint_state import TrainerCheckpointState

        self.name = name
        state = TrainerCheckpointState(trainer)
        specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
        pool = HostPool(f"bench-{name.replace(' ', '_')}-{os.getpid()}", 0, specs, slots, None)
        levels = []
        if l1_interval:
            levels.append(Level("L1", os.path.join(workdir, name.replace(" ", "_"), "l1"), l1_interval, 1))
        levels.append(Level("L2", os.path.join(workdir, name.replace(" ", "_"), "l2"), l2_interval, 1, None, write_rate))
        self.engine = CheckpointEngine(state, pool, levels, dist.new_group(backend="gloo"), lambda m: None, state.layout,
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
        from checkpointing.host_pool import remove_pool

        self.engine.close(drain=True)
        remove_pool(self.engine.pool)  # slots, descriptions and the control block


class CheckFreqStyle(Method):
    """The simple design the engine generalises (CheckFreq's): after the step, one thread copies
    the whole state into a pre-touched host buffer and writes it raw (``O_DIRECT``, no framing, no
    checksums, no commit); one global fence: the next step waits until the copy is done."""

    name = "CheckFreq-style: copy thread + raw O_DIRECT write, one global fence"

    def start(self):
        import threading

        import torch

        import mmap

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


def flat_state(trainer):
    opt = trainer.optimizer
    return {"fp32_param": opt.main_params, "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}


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


def _split(spec: str) -> tuple[str, str]:
    """``engine-l0@passive`` -> (``engine-l0``, ``PASSIVE``); no suffix: OpenMP's default."""
    name, _, policy = spec.partition("@")
    return name, policy.upper()


def label(spec: str) -> str:
    name, policy = _split(spec)
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


def run_child(spec: str, iters: int, warmup: int, workdir: str) -> dict:
    """One method in a fresh process: OpenMP reads its wait policy once, at load."""
    import subprocess

    name, policy = _split(spec)
    env = dict(os.environ)
    for variable in ("OMP_WAIT_POLICY", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a job of its own
        env.pop(variable, None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--iters", str(iters), "--warmup", str(warmup),
           "--workdir", workdir]
    return _child_result(subprocess.run(cmd, env=env, capture_output=True, text=True), f"bench child {spec}")


def child(name: str, iters: int, warmup: int, workdir: str) -> None:
    """Train ``warmup + iters`` iterations checkpointing every one with method ``name``; print JSON."""
    import json

    trainer = build_trainer()
    for _ in range(2):
        trainer.train_step()
    m = METHODS[name](trainer, workdir)
    m.start()
    times = []
    for i in range(warmup + iters):
        if i == warmup:
            cpu_before = thread_cpu_seconds()
            machine_before = machine_cpu_ticks()
            flusher_before = _flusher_cpu(m)
        started = time.perf_counter()
        trainer.train_step()
        m.checkpoint(trainer.iteration)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    cpu_after = thread_cpu_seconds()
    flusher_after = _flusher_cpu(m)
    machine = [b - a for a, b in zip(machine_before, machine_cpu_ticks())]
    m.stop()
    cpu = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) / iters for name in cpu_after}
    if flusher_after is not None:
        cpu["flusher process"] = (flusher_after - flusher_before) / iters
    result = {"times": times, "bytes": state_bytes(trainer), "cpu": {k: v for k, v in cpu.items() if v >= 0.005},
              "steal": machine[7] / max(sum(machine), 1), "idle": (machine[3] + machine[4]) / max(sum(machine), 1)}
    result.update(blocked=sum(m.blocked[-iters:]))
    if isinstance(m, EngineMethod):
        result.update(persisted=m.persisted, superseded=sum(m.engine.stats.skipped.values()),
                      copied_gb=m.bytes_copied / 1e9)
        m.close()
    else:
        result.update(persisted=0 if isinstance(m, CopyFloor) else len(m.blocked), superseded=0)
    print(json.dumps(result), flush=True)


def _flusher_cpu(method) -> float | None:
    """The engine's flusher process's CPU seconds so far (its clock, from the control block)."""
    if not isinstance(method, EngineMethod):
        return None
    from checkpointing import control_block

    return method.engine.block[control_block.CPU_NS] / 1e9


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) this process's threads used so far, summed by thread name
    (the training thread is the process's name; OpenMP workers share one name)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                text = f.read()
        except FileNotFoundError:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def machine_cpu_ticks() -> list[int]:
    """The machine's CPU ticks by state (user nice system idle iowait irq softirq steal ...):
    steal is the time the hypervisor gave this VM's CPUs to someone else, the noise here."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def part_overhead(workdir, rounds, iters, specs, warmup=2) -> None:
    """Interleaved rounds; each method runs in its own process per round (see ``run_child``)."""
    times = {s: [] for s in specs}
    blocked = {s: [0.0, 0] for s in specs}
    persisted = {s: [0, 0] for s in specs}
    nbytes = 0
    for r in range(rounds):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            out = run_child(spec, iters, warmup, workdir)
            nbytes = out["bytes"]
            times[spec] += out["times"]
            blocked[spec][0] += out["blocked"]
            blocked[spec][1] += iters
            persisted[spec][0] += out["persisted"]
            persisted[spec][1] += warmup + iters
            print(f"  round {r + 1}: {label(spec)}: median {statistics.median(out['times']):.3f} s/it "
                  f"({' '.join(f'{t:.2f}' for t in out['times'])}); {out['persisted']} versions on disk, "
                  f"{out['superseded']} superseded, {out.get('copied_gb', 0):.2f} GB copied by the engine; machine CPU steal {100 * out['steal']:.1f}%, idle "
                  f"{100 * out['idle']:.1f}%; CPU s/it by thread: "
                  f"{', '.join(f'{k} {v:.2f}' for k, v in sorted(out['cpu'].items(), key=lambda kv: -kv[1]))}", flush=True)
    base = statistics.median(times["none"])
    print(f"\n## Overhead: checkpoint every iteration, {nbytes / 1e9:.2f} GB of state, {rounds} interleaved rounds of "
          f"{iters} iterations (after {warmup} warm-up), one process per method and round\n")
    print("| method | median s/iteration | overhead vs none | vs none with the same OpenMP policy | "
          "blocked ms per checkpoint | blocked ms per GB | versions on disk |\n|---|---|---|---|---|---|---|")
    for spec, values in times.items():
        med = statistics.median(values)
        ms = 1000 * blocked[spec][0] / max(blocked[spec][1], 1)
        disk = "-" if spec.startswith("none") else f"{persisted[spec][0]} of {persisted[spec][1]}"
        policy = _split(spec)[1]
        same = "none" + (f"@{policy.lower()}" if policy else "")
        vs_same = f"{100 * (med / statistics.median(times[same]) - 1):+.1f}%" if same in times else "-"
        print(f"| {label(spec)} | {med:.3f} | {100 * (med / base - 1):+.1f}% | {vs_same} | {ms:.2f} | "
              f"{ms / (nbytes / 1e9):.2f} | {disk} |")


HOST_BOUND_MODEL = ("--num-layers 16 --hidden-size 128 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 "
                    "--vocab-size 1024 --mock-data --micro-batch-size 1 --global-batch-size 8 --lr 1e-4 "
                    "--hidden-dropout 0 --attention-dropout 0 --use-distributed-optimizer --log-interval 1").split()
HOST_BOUND_ROWS = {
    "none": [],
    "L0 every it + L1 every 10th": ["--async-save", "--save-interval", "1", "--ckpt-local-interval", "10",
                                    "--ckpt-persistent-interval", "1000000"],
    "every it to disk (L2)": ["--async-save", "--save-interval", "1"],
}


def run_host_bound(row: str, iters: int, warmup: int, workdir: str) -> dict:
    """``pretrain_gpt.py`` as a user runs it, one OpenMP thread; the time between consecutive
    console lines (one per iteration, printed right after the step) is what an iteration costs
    with everything around it (the checkpoint request included), read as the lines arrive."""
    import re
    import subprocess

    base = os.path.join(workdir, "host-bound", row.split()[0].replace(" ", "_"))
    shutil.rmtree(base, ignore_errors=True)
    extra = list(HOST_BOUND_ROWS[row])
    if extra:
        extra += ["--save", os.path.join(base, "l2")]
        if "--ckpt-local-interval" in extra:
            extra += ["--ckpt-local-dir", os.path.join(base, "l1")]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GPT_FORCE_CPU="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           os.path.join(ROOT, "scripts", "pretrain_gpt.py"), *HOST_BOUND_MODEL, "--train-iters", str(warmup + iters), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    arrivals, lines = [], []
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"\s*iteration\s+\d+/", line):
            arrivals.append(time.perf_counter())
    if proc.wait() != 0:
        raise RuntimeError(f"host-bound {row}: pretrain_gpt.py failed:\n{''.join(lines[-30:])}")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])][warmup:]
    summary = [line.rstrip() for line in lines if line.startswith(("> checkpointing summary", "  training process",
                                                                   "  flusher processes", "  machine:", "> async checkpointing"))]
    shutil.rmtree(base, ignore_errors=True)
    return {"times": gaps, "summary": summary}


def part_host_bound(workdir: str, rounds: int, iters: int, warmup: int = 3) -> None:
    """A host-bound loop with a core to spare (issue 24): a model whose iteration is Python and op
    dispatch, one OpenMP thread; interleaved rounds of the product CLI per row."""
    times = {row: [] for row in HOST_BOUND_ROWS}
    summaries = {}
    for r in range(rounds):
        for row in (list(HOST_BOUND_ROWS) if r % 2 == 0 else list(HOST_BOUND_ROWS)[::-1]):
            out = run_host_bound(row, iters, warmup, workdir)
            times[row] += out["times"]
            summaries[row] = out["summary"]
            print(f"  round {r + 1}: {row}: median {1000 * statistics.median(out['times']):.1f} ms/it", flush=True)
            for line in out["summary"]:
                print(f"      {line}", flush=True)
    base = statistics.median(times["none"])
    print(f"\n## Host-bound: 16 layers x 128, seq 64, 8 micro-batches of 1, OMP_NUM_THREADS=1, {rounds} interleaved "
          f"rounds of {iters} iterations (after {warmup})\n")
    print("| --async-save setting | median ms/iteration | vs none |\n|---|---|---|")
    for row, values in times.items():
        med = statistics.median(values)
        print(f"| {row} | {1000 * med:.1f} | {100 * (med / base - 1):+.1f}% |")


DEFAULT_METHODS = ("none,none@passive,engine-l0,engine-l0@passive,engine-zc-l0,engine-zc-l0@passive,engine-disk,"
                   "engine-zc-disk,engine-zc-disk@passive,checkfreq,dcp-async-staged,dcp-async-thread")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("format", "flush-cost", "restore", "overhead", "host-bound", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, of {', '.join(METHODS)}, each with an optional @passive or @active "
                             "(OMP_WAIT_POLICY of its process)")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--reader-file", help="restore: also time the CheckpointReader defined in this file, e.g. the "
                        "one before issue 18 (git show 2ffe828:checkpointing/reader.py > /tmp/reader_before.py)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-restore", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.iters, args.warmup, args.workdir)
        return 0
    if args.child_restore:
        child_restore(args.child_restore, args.reader_file)
        return 0
    specs = ["none", *(m for m in args.methods.split(",") if m and m != "none")]
    for spec in specs:
        if _split(spec)[0] not in METHODS:
            parser.error(f"unknown method {spec!r}; choose from {', '.join(METHODS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-ckpt-", dir="/tmp")
    try:
        if args.part in ("format", "flush-cost", "restore", "all"):
            trainer = build_trainer()
            print(f"> model: {trainer.job.model.num_parameters(1) / 1e6:.1f}M parameters, "
                  f"{state_bytes(trainer) / 1e9:.2f} GB checkpointed state", flush=True)
            for _ in range(2):
                trainer.train_step()
            if args.part in ("format", "all"):
                part_format(trainer, workdir)
            if args.part in ("flush-cost", "all"):
                part_flush_cost(trainer, workdir, max(args.rounds, 3))
            if args.part in ("restore", "all"):
                part_restore(trainer, workdir, args.rounds, args.reader_file)
            del trainer
        if args.part in ("overhead", "all"):
            part_overhead(workdir, args.rounds, args.iters, specs, args.warmup)
        if args.part in ("host-bound", "all"):
            part_host_bound(workdir, args.rounds, args.iters)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
