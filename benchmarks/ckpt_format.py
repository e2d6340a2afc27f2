"""The CPU bench's ``format`` and ``flush-cost`` parts: one synchronous save and load of the
state next to the machine's raw write and read of the same bytes, and what one flush costs the CPU
against the raw ``O_DIRECT`` write a CheckFreq-style design makes."""

from __future__ import annotations

import os
import shutil
import statistics
import time

from benchmarks.ckpt_state import flat_state, state_bytes
from benchmarks.raw_io import drop_cache, raw_bandwidth


def part_format(trainer, workdir: str) -> None:
    import torch.distributed as dist

    from checkpointing.base import sync_level
    from checkpointing.format import CheckpointReader, iteration_dir, save_and_commit
    from trainer.checkpoint_state import TrainerCheckpointState

    state = TrainerCheckpointState(trainer)
    group = dist.new_group(backend="gloo")
    nbytes = state_bytes(trainer)
    write_bw, read_bw = raw_bandwidth(workdir, nbytes)
    root = os.path.join(workdir, "format")
    result = save_and_commit(sync_level(root), 1, state.arrays, state.save_pieces, state.capture_small_state(1), state.layout, group)
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

    from checkpointing.base import sync_level
    from checkpointing.format import save_and_commit
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
                        state.capture_small_state(version[0]), state.layout, group)

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
