#!/usr/bin/env python
"""What a rollback costs: live (in the running job) against a relaunch, on the same job.

For each state size, a 2-process TP2 job (``pretrain_gpt.py``, ``--async-save``, L0 every
iteration with the last 4 versions, L2 every ``--l2-every``) runs; the time is taken from the
moment the rollback is asked for to the wall-clock time of the first iteration after the step
rolled back to (its ``--metrics-file`` object):

- ``live, L0``: ``scripts/rollback.sh STEP --live`` to the previous iteration (held in L0);
- ``live, L2 only``: ``scripts/rollback.sh STEP --live`` to a version only L2 holds;
- ``relaunch``: the job stopped (SIGTERM, flushes drained), then ``scripts/rollback.sh STEP`` and
  ``torchrun`` again, to the same L2 version; and that minus the relaunched job's own start-up
  (its ``startup`` object: launch to the end of its first iteration).

A live rollback's time is the wait for the iteration boundary (the request is taken inside a
step, before its gradient reduction: up to two iterations, one on average), the rollback itself
(``of it in the job``: the job's own measure, from the boundary to the restored state), and the
iteration after it; the median iteration time is in the table.

    python scripts/bench_rollback.py [--sizes 45MB 1GB] [--out results/bench_rollback_cpu.md]

``--idle-cost CHECKOUT`` measures instead what the rollback machinery costs an iteration when no
rollback is asked: ``bench_checkpoint.py``'s host-bound rows (``none``; L0 every iteration + L1
every 10th), this checkout's ``pretrain_gpt.py`` against CHECKOUT's (e.g. ``git worktree add
/tmp/before <commit>``), interleaved rounds, median time between iterations.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing.storage import host_pool  # noqa: E402
from trainer.metrics_file import read_metrics_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    # bench_checkpoint.py's host-bound model (~45 MB of fp32 weights and Adam moments), one
    # micro-batch per iteration as the 1 GB row: a live rollback's time is mostly iterations.
    "45MB": ("--num-layers 16 --hidden-size 128 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 "
             "--vocab-size 1024 --micro-batch-size 1 --global-batch-size 1", 10, 24),
    # ~83M parameters: ~1 GB of training state.
    "1GB": ("--num-layers 6 --hidden-size 1024 --num-attention-heads 8 --ffn-hidden-size 4096 --seq-length 32 "
            "--max-position-embeddings 32 --vocab-size 8192 --micro-batch-size 1 --global-batch-size 1", 5, 12),
}
"""size: (model flags, L2 every, the iteration to reach before the first rollback)."""


def launch(args: list[str], log: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "scripts", "pretrain_gpt.py"), *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def wait_for(metrics: str, accept, job: subprocess.Popen, log: str, timeout: float = 900) -> dict:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for record in read_metrics_file(metrics).iterations:
            if accept(record):
                return record
        if job.poll() is not None:
            raise RuntimeError(f"the job ended ({job.returncode}); see {log}")
        time.sleep(0.02)
    raise TimeoutError(f"no matching iteration in {timeout:.0f} s; see {log}")


def rollback(*argv: str) -> float:
    """Run scripts/rollback.sh; returns the wall time it was asked at."""
    asked = time.time()
    done = subprocess.run([os.path.join(ROOT, "scripts", "rollback.sh"), *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"rollback.sh {' '.join(argv)}: {done.stdout}{done.stderr}")
    return asked


def measure(size: str, workdir: str) -> dict:
    model, l2_every, reach = SIZES[size]
    save = os.path.join(workdir, size, "ckpt")
    metrics = os.path.join(workdir, size, "metrics.jsonl")
    log = os.path.join(workdir, size, "job.log")
    os.makedirs(os.path.dirname(save), exist_ok=True)
    # --lr-decay-iters: the relaunch trains to another --train-iters on the same schedule.
    args = [*model.split(), "--mock-data", "--lr", "1e-4", "--lr-decay-iters", "100000", "--log-interval", "1",
            "--tensor-model-parallel-size", "2",
            "--async-save", "--save-interval", "1", "--ckpt-host-versions", "4", "--ckpt-persistent-interval",
            str(l2_every), "--save", save, "--load", save, "--metrics-file", metrics]
    row: dict = {"size": size}
    job = launch([*args, "--train-iters", "100000"], log)
    try:
        current = wait_for(metrics, lambda r: r["iteration"] >= reach, job, log)["iteration"]
        # Live, to the previous iteration (L0).
        step = current
        asked = rollback(str(step - 1), "--live", "--save", save)
        step -= 1
        row["live L0"] = wait_for(metrics, lambda r: r["iteration"] == step + 1 and r["time"] > asked, job, log)["time"] - asked
        row["live L0 (job)"] = read_metrics_file(metrics).rollbacks[-1]["seconds"]
        # Live, to a version only L2 holds (L0 keeps the last 4).
        l2_step = l2_every
        current = wait_for(metrics, lambda r: r["time"] > asked and r["iteration"] >= l2_step + 6, job, log)["iteration"]
        asked = rollback(str(l2_step), "--live", "--save", save)
        row["live L2"] = wait_for(metrics, lambda r: r["iteration"] == l2_step + 1 and r["time"] > asked, job, log)["time"] - asked
        last = read_metrics_file(metrics).rollbacks[-1]
        row["live L2 (job)"], row["live L2 source"] = last["seconds"], last["source"]
        wait_for(metrics, lambda r: r["time"] > asked and r["iteration"] >= l2_step + 6, job, log)
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=600)
    # Relaunch: rollback.sh on the stopped job, then torchrun, to the same L2 version.
    asked = rollback(str(l2_step), "--save", save)
    job = launch([*args, "--train-iters", str(l2_step + 2)], log + ".relaunch")
    try:
        row["relaunch"] = wait_for(metrics, lambda r: r["iteration"] == l2_step + 1 and r["time"] > asked, job,
                                   log + ".relaunch")["time"] - asked
        job.wait(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
            job.wait(timeout=600)
    records = read_metrics_file(metrics)
    row["relaunch start-up"] = records.startup["seconds"]
    times = sorted(r["iteration_time_ms"] / 1000 for r in records.iterations)
    row["iteration s"] = times[len(times) // 2]
    row["state MB"] = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(save, f"iter_{l2_step:07d}"))
                          for f in fs) / 1e6
    host_pool.remove_segments(save)
    return row


def idle_cost(baseline: str, rounds: int, iters: int) -> str:
    """Markdown lines: median ms per iteration of the host-bound rows, this checkout against ``baseline``."""
    import statistics

    from benchmarks.host_bound import PRETRAIN, run_host_bound

    rows = ["none", "L0 every it + L1 every 10th"]
    trees = {"this checkout": PRETRAIN, "baseline": os.path.join(os.path.abspath(baseline), "scripts", "pretrain_gpt.py")}
    times = {(row, tree): [] for row in rows for tree in trees}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as workdir:
        for r in range(rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for row in rows:
                for tree in order:
                    gaps = run_host_bound(row, iters, 3, workdir, trees[tree])["times"]
                    times[row, tree] += gaps
                    print(f"  round {r + 1}: {row}, {tree}: {1000 * statistics.median(gaps):.1f} ms/it", flush=True)
    lines = [f"| host-bound row | this checkout (ms/it) | {os.path.abspath(baseline)} (ms/it) | ratio |", "|---|---|---|---|"]
    for row in rows:
        ours, theirs = statistics.median(times[row, "this checkout"]), statistics.median(times[row, "baseline"])
        lines.append(f"| {row} | {1000 * ours:.1f} | {1000 * theirs:.1f} | {ours / theirs:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["45MB", "1GB"])
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--idle-cost", metavar="CHECKOUT", help="measure the per-iteration cost against CHECKOUT instead")
    parser.add_argument("--rounds", type=int, default=3, help="with --idle-cost: interleaved rounds")
    parser.add_argument("--iters", type=int, default=20, help="with --idle-cost: iterations per run (after 3)")
    args = parser.parse_args()
    if args.idle_cost:
        table = idle_cost(args.idle_cost, args.rounds, args.iters)
        print(table)
        if args.out:
            with open(args.out, "a") as f:
                f.write(f"\n## No rollback asked: the host-bound rows against the checkout before\n\n"
                        f"`python scripts/bench_rollback.py --idle-cost {args.idle_cost} --rounds {args.rounds} "
                        f"--iters {args.iters} --out {args.out}`\n\n{table}\n")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rollback-", dir=os.environ.get("TMPDIR", "/tmp")) as workdir:
        for size in args.sizes:
            print(f"> {size} ...", flush=True)
            rows.append(measure(size, workdir))
            print(f"  {rows[-1]}", flush=True)
    lines = ["| state | iteration (s) | live to L0 (s) | of it in the job | live to L2-only (s) | of it in the job "
             "| relaunch (s) | relaunch start-up (s) | relaunch / live L0 | live L2 / (relaunch - start-up) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['state MB']:.0f} MB | {r['iteration s']:.2f} | {r['live L0']:.2f} | {r['live L0 (job)']:.2f} | {r['live L2']:.2f} "
                     f"({r['live L2 source']}) | {r['live L2 (job)']:.2f} | {r['relaunch']:.2f} | "
                     f"{r['relaunch start-up']:.2f} | {r['relaunch'] / r['live L0']:.1f}x | "
                     f"{r['live L2'] / max(r['relaunch'] - r['relaunch start-up'], 1e-9):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Rollback: live against relaunch ({time.strftime('%Y-%m-%d')}, this machine, CPU)\n\n"
                    f"`python scripts/bench_rollback.py --sizes {' '.join(args.sizes)} --out {args.out}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
