"""The CPU bench (``scripts/bench_checkpoint.py``): what checkpointing costs training on this
machine, measured as ratios within one run, part by part."""

from __future__ import annotations

import shutil
import tempfile

from benchmarks.ckpt_format import part_flush_cost, part_format
from benchmarks.ckpt_overhead import part_overhead
from benchmarks.ckpt_restore import part_restore
from benchmarks.ckpt_state import build_trainer, state_bytes
from benchmarks.host_bound import part_host_bound
from benchmarks.methods import METHODS, split_spec

PARTS = ("format", "flush-cost", "restore", "overhead", "host-bound", "all")


class UnknownMethod(ValueError):
    """A ``--methods`` entry that is not one of :data:`benchmarks.methods.METHODS`."""


def method_specs(methods: str) -> list[str]:
    """``none`` first, then the comma-separated ``methods`` (each with an optional ``@policy``)."""
    specs = ["none", *(m for m in methods.split(",") if m and m != "none")]
    for spec in specs:
        if split_spec(spec)[0] not in METHODS:
            raise UnknownMethod(f"unknown method {spec!r}; choose from {', '.join(METHODS)}")
    return specs


def run_parts(part: str, rounds: int, iters: int, warmup: int, specs: list[str], workdir: str | None,
              reader_file: str | None) -> None:
    """Run ``part`` (or all of them) in ``workdir`` (None: a temporary directory, removed after)."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="bench-ckpt-", dir="/tmp")
    try:
        if part in ("format", "flush-cost", "restore", "all"):
            trainer = build_trainer()
            print(f"> model: {trainer.job.model.num_parameters(1) / 1e6:.1f}M parameters, "
                  f"{state_bytes(trainer) / 1e9:.2f} GB checkpointed state", flush=True)
            for _ in range(2):
                trainer.train_step()
            if part in ("format", "all"):
                part_format(trainer, workdir)
            if part in ("flush-cost", "all"):
                part_flush_cost(trainer, workdir, max(rounds, 3))
            if part in ("restore", "all"):
                part_restore(trainer, workdir, rounds, reader_file)
            del trainer
        if part in ("overhead", "all"):
            part_overhead(workdir, rounds, iters, specs, warmup)
        if part in ("host-bound", "all"):
            part_host_bound(workdir, rounds, iters)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
