"""The CPU bench's ``host-bound`` part: the product CLI (``pretrain_gpt.py``) on a model whose
iteration is Python and op dispatch (16 layers x 128, seq 64, 8 micro-batches of 1), one OpenMP
thread, so the second core is free for the flusher process; interleaved rounds per row, the time
between consecutive iterations, with the run's summary."""

from __future__ import annotations

import os
import shutil
import statistics
import sys

from benchmarks.processes import PRETRAIN, LoggedProcess, job_env
from trainer.metrics_file import read_metrics_file

HOST_BOUND_MODEL = ("--num-layers 16 --hidden-size 128 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 "
                    "--vocab-size 1024 --mock-data --micro-batch-size 1 --global-batch-size 8 --lr 1e-4 "
                    "--hidden-dropout 0 --attention-dropout 0 --use-distributed-optimizer --log-interval 1").split()
HOST_BOUND_ROWS = {
    "none": [],
    "L0 every it + L1 every 10th": ["--async-save", "--save-interval", "1", "--ckpt-local-interval", "10",
                                    "--ckpt-persistent-interval", "1000000"],
    "every it to disk (L2)": ["--async-save", "--save-interval", "1"],
}
SUMMARY_PREFIXES = ("> checkpointing summary", "  training process", "  flusher processes", "  machine:",
                    "> async checkpointing")
"""The trainer's console lines each round shows as printed."""


def run_host_bound(row: str, iters: int, warmup: int, workdir: str, pretrain: str = PRETRAIN) -> dict:
    """``pretrain_gpt.py`` as a user runs it, one OpenMP thread; the time between consecutive
    iterations' objects in its metrics file (one per iteration, written right after the
    iteration's checkpoint request) is what an iteration costs with everything around it.
    ``pretrain``: the ``pretrain_gpt.py`` to run (another checkout's, for a comparison)."""
    base = os.path.join(workdir, "host-bound", row.split()[0].replace(" ", "_"))
    shutil.rmtree(base, ignore_errors=True)
    extra = list(HOST_BOUND_ROWS[row])
    if extra:
        extra += ["--save", os.path.join(base, "l2")]
        if "--ckpt-local-interval" in extra:
            extra += ["--ckpt-local-dir", os.path.join(base, "l1")]
    metrics = os.path.join(base, "metrics.jsonl")
    env = job_env({"OMP_NUM_THREADS": "1", "GPT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", pretrain,
           *HOST_BOUND_MODEL, "--train-iters", str(warmup + iters), "--metrics-file", metrics, *extra]
    rc, _, _, text = LoggedProcess(cmd, env, os.path.join(base, "console.log"), None).finish()
    lines = text.splitlines(keepends=True)
    if rc != 0:
        raise RuntimeError(f"host-bound {row}: pretrain_gpt.py failed:\n{''.join(lines[-30:])}")
    stamps = [record["time"] for record in read_metrics_file(metrics).iterations]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    summary = [line.rstrip() for line in lines if line.startswith(SUMMARY_PREFIXES)]
    shutil.rmtree(base, ignore_errors=True)
    return {"times": gaps, "summary": summary}


def part_host_bound(workdir: str, rounds: int, iters: int, warmup: int = 3) -> None:
    """A host-bound loop with a core to spare: a model whose iteration is Python and op dispatch,
    one OpenMP thread; interleaved rounds of the product CLI per row."""
    times = {row: [] for row in HOST_BOUND_ROWS}
    for r in range(rounds):
        for row in (list(HOST_BOUND_ROWS) if r % 2 == 0 else list(HOST_BOUND_ROWS)[::-1]):
            out = run_host_bound(row, iters, warmup, workdir)
            times[row] += out["times"]
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
