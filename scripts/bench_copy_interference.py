#!/usr/bin/env python
"""What one L0 snapshot costs the training iteration it runs beside, paired within one process.

The bench model of ``bench_checkpoint.py`` (1.01 GB of checkpointed state) trains with the
engine (L0 only). A request is made after every other iteration, so iterations that carry a
background copy alternate with iterations that do not, minutes apart at most: the machine's
drift, which makes separate processes differ by 10% here, cancels. Since the flusher process
(issue 24) a copied snapshot on the host is taken inside ``request`` on the training thread, so
the copy variants now measure that synchronous copy (the measurements in ``results/`` before
2026-12-02 were of a copy thread beside the next step). Variants of what the copy does,
interleaved:

- ``copy``: the engine's copier as it is (one ``memmove`` per array and shard, one thread);
- ``copy-two-threads``: ``Tensor.copy_`` with an intra-op pool of 2 (the copier before);
- ``spin``: no copy, the copy thread only burns as much CPU time as ``copy`` took (median),
  with no memory traffic: what the CPU alone costs, as a control;
- ``zero-copy``: no copy at all: that iteration's optimizer step writes the version out of place
  into a slot of a zero-copy engine's pool, and the request after it only describes the slot
  (``--ckpt-snapshot zero-copy``), against the in-place step of the iterations without.

Slowdown = median of the iterations after a request / median of those without - 1.

    python scripts/bench_copy_interference.py [--pairs 30] [--variants copy,copy-two-threads,spin]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

VARIANTS = ("copy", "copy-two-threads", "spin", "zero-copy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="iterations with a copy, per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if "spin" in variants and "copy" not in variants:
        parser.error("spin burns the CPU time that copy takes: run it with copy")

    import bench_checkpoint as bench
    import torch

    from checkpointing.engine import copy_bytes

    trainer = bench.build_trainer()
    for _ in range(2):
        trainer.train_step()
    # L0 only (no level is ever due), 2 host versions: no flush runs beside the measured iterations
    method = bench.EngineMethod(trainer, tempfile.mkdtemp(prefix="bench-copy-"), "copy interference", None, 10**9, 2)
    method.start()
    engine = method.engine
    copier = engine.snapshots.copier  # since issue 24 the copy runs inside request, on the training thread
    current = {"variant": "copy"}
    copy_cpu: list[float] = []  # CPU seconds of one whole copy (all shards), variant copy
    this_copy = {"cpu": 0.0}

    def copy(index, pairs):
        """Stands in for HostShardCopier.copy: the variant decides what the copy thread does."""
        variant, started = current["variant"], time.thread_time()
        if index == 0:
            this_copy["cpu"] = 0.0
        if variant == "copy":
            for dst, src in pairs:
                copy_bytes(dst, src)
        elif variant == "copy-two-threads":
            torch.set_num_threads(2)
            for dst, src in pairs:
                dst.copy_(src)
            torch.set_num_threads(1)
        elif variant == "spin" and index == 0:
            until = started + statistics.median(copy_cpu)
            while time.thread_time() < until:
                pass
        this_copy["cpu"] += time.thread_time() - started
        if variant == "copy" and index == len(engine.state.shards) - 1:
            copy_cpu.append(this_copy["cpu"])
        copier._done[index].set()

    copier.copy = copy
    zero_copy = None
    if "zero-copy" in variants:
        from trainer.checkpointer import _PoolVersions

        zero_copy = bench.EngineMethod(trainer, tempfile.mkdtemp(prefix="bench-zc-"), "zero-copy interference", None,
                                       10**9, 3, zero_copy=True)
    copy_fence = list(trainer.optimizer.before_shard_update)
    variants.sort(key=lambda v: v != "copy")  # copy first: spin burns the CPU time copy took
    order = [x for v in variants for x in ("off", v)] * args.pairs
    times: dict[str, list[float]] = {v: [] for v in ["off", *variants]}
    steal: dict[str, list[float]] = {v: [] for v in times}
    print(f"> OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {len(order)} iterations, {len(variants)} variants interleaved with iterations without a copy", flush=True)
    for i, variant in enumerate(order):
        if variant == "zero-copy":  # this step writes into the pool: the snapshot, with no copy
            trainer.optimizer.versions = _PoolVersions(zero_copy.engine)
            trainer.optimizer.before_shard_update[:] = [lambda shard: zero_copy.engine.fence(shard.index)]
        elif variant != "off":
            current["variant"] = variant
            engine.request(trainer.iteration)
        ticks = bench.machine_cpu_ticks()
        started = time.perf_counter()
        trainer.train_step()
        if variant == "zero-copy":
            zero_copy.engine.request(trainer.iteration)  # describes the slot the step wrote
            trainer.optimizer.versions = None
            trainer.optimizer.before_shard_update[:] = copy_fence
        times[variant].append(time.perf_counter() - started)
        delta = [b - a for a, b in zip(ticks, bench.machine_cpu_ticks())]
        steal[variant].append(delta[7] / max(sum(delta), 1))
        engine.wait_idle(drain=False)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(order)} iterations", flush=True)
    method.stop()
    method.close()
    if zero_copy is not None:
        zero_copy.close()
    base = statistics.median(times["off"])
    print("\n| what the copy thread does beside the next iteration | iterations | median s/it | slowdown (median) | "
          "slowdown (mean) | machine CPU steal |\n|---|---|---|---|---|---|")
    for variant, values in times.items():
        med = statistics.median(values)
        mean_ratio = statistics.mean(values) / statistics.mean(times["off"]) - 1
        what = {"off": "nothing (no request)", "spin": f"spin {statistics.median(copy_cpu):.2f} CPU-s"}.get(variant, variant)
        print(f"| {what} | {len(values)} | {med:.3f} | {100 * (med / base - 1):+.1f}% | {100 * mean_ratio:+.1f}% | "
              f"{100 * statistics.mean(steal[variant]):.1f}% |")
    if copy_cpu:
        print(f"\ncopy: {statistics.median(copy_cpu):.3f} CPU-s per snapshot of {bench.state_bytes(trainer) / 1e9:.2f} GB "
              f"on the copy thread (median of {len(copy_cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
