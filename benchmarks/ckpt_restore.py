"""The CPU bench's ``restore`` part: a resume's read of one committed checkpoint in a fresh
process whose trainer is built, next to raw sequential ``O_DIRECT`` reads of the same files, the
page cache dropped before each, in interleaved rounds."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

from benchmarks.ckpt_state import build_trainer
from benchmarks.processes import BENCH_CHECKPOINT, child_json, job_env
from benchmarks.raw_io import dd_read, drop_cache, raw_direct_read


def optimizer_pieces(state):
    from checkpointing.format import keys

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

    from checkpointing.format import keys
    from trainer.checkpoint_state import TrainerCheckpointState

    if reader_file:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_reader_under_test", reader_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reader_class = module.CheckpointReader
    else:
        from checkpointing.format import CheckpointReader as reader_class
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


def run_restore_child(directory: str, reader_file: str | None) -> dict:
    """:func:`child_restore` in a fresh process, a job of its own; its JSON."""
    cmd = [sys.executable, BENCH_CHECKPOINT, "--child-restore", directory]
    if reader_file:
        cmd += ["--reader-file", reader_file]
    return child_json(cmd, job_env(), "restore child")


def part_restore(trainer, workdir: str, rounds: int, reader_file: str | None) -> None:
    """Save ``trainer``'s state once; then ``rounds`` interleaved rounds of raw ``O_DIRECT`` reads
    of its data files (``dd``, and into huge pages) and a resume's read through the reader (each
    in a fresh process), the page cache dropped before each. Ratios: the reader's GB/s over each
    raw read's of the same round."""
    import torch.distributed as dist

    from checkpointing.base import sync_level
    from checkpointing.format import iteration_dir, save_and_commit
    from trainer.checkpoint_state import TrainerCheckpointState

    state = TrainerCheckpointState(trainer)
    root = os.path.join(workdir, "restore")
    save_and_commit(sync_level(root), 1, state.arrays, state.save_pieces, state.capture_small_state(1), state.layout,
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
