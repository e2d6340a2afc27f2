"""The peer-replica bench (issue 25): what replicating every L0 version to another node costs
training, and what a resume after a lost node costs from memory against from the file system.

Two "nodes" on this machine (``benchmarks.two_nodes``: two torchrun launchers, each node its own
``--ckpt-host-dir``), the product CLI as a user runs it.

- ``overhead``: DP2, one rank per node, rows none / L0 every iteration / L0 every iteration plus
  ``--ckpt-peer-replicas 1`` (every version, and every 10th), interleaved rounds, on the
  host-bound model of the engine bench and on its ~1 GB model (each rank's version ~1 GB: no
  distributed optimizer). The time between consecutive iterations of the logging rank's ``--metrics-file`` is what an iteration costs with
  everything around it; the run's summary gives the flushers' CPU.
- ``recovery``: TP2xDP2, two ranks per node, L0 every iteration with replicas, L2 every 4th,
  killed after iteration 11 (``GPT_CKPT_HOLD=request``: version 10 is wholly replicated before
  iteration 11 runs, on any machine; L2 holds 8). From copies of what it left: node B replaced
  (its host memory empty), which resumes from memory; every node's host memory gone, which
  resumes from L2 (page cache dropped first). Reported: the restart's load (its "loaded
  iteration" line), the staging from memory, the bytes read from ``--save``, the time from
  launch to the first trained iteration and to training back at iteration 11 (the iterations
  redone included).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import time
import uuid

from benchmarks.ckpt_state import MODEL as ONE_GB_MODEL
from benchmarks.host_bound import HOST_BOUND_MODEL, SUMMARY_PREFIXES
from benchmarks.raw_io import drop_cache
from benchmarks.two_nodes import run_two_node_trainer
from trainer.metrics_file import read_metrics_file

OVERHEAD_MODELS = {
    "host-bound": HOST_BOUND_MODEL,
    # The engine bench's ~1 GB model (fp32 weights and both Adam moments); DP2 keeps every rank's
    # whole state (no distributed optimizer): each rank's version is ~1 GB, replicated whole.
    "1 GB": [a for a in ONE_GB_MODEL if a not in ("--train-iters", "100000")],
}
L0_EVERY_IT = ["--async-save", "--save-interval", "1", "--ckpt-persistent-interval", "1000000"]
OVERHEAD_ROWS = {
    "none": [],
    "L0 every iteration": L0_EVERY_IT,
    "L0 every iteration + replicas (K=1)": L0_EVERY_IT + ["--ckpt-peer-replicas", "1"],
    "L0 every iteration + replicas every 10th": L0_EVERY_IT + ["--ckpt-peer-replicas", "1",
                                                               "--ckpt-peer-interval", "10"],
}
RECOVERY_MODEL = ("--num-layers 6 --hidden-size 512 --num-attention-heads 8 --seq-length 128 "
                  "--max-position-embeddings 128 --vocab-size 8192 --mock-data --micro-batch-size 1 "
                  "--global-batch-size 4 --lr 1e-4 --hidden-dropout 0 --attention-dropout 0 "
                  "--use-distributed-optimizer --tensor-model-parallel-size 2 --log-interval 1").split()
RECOVERY_CKPT = ["--async-save", "--save-interval", "1", "--ckpt-persistent-interval", "4", "--ckpt-peer-replicas", "1"]
KILL_AT = 11
TRAIN_ITERS = KILL_AT + 3


def _host_dirs(tag: str) -> dict[str, str]:
    return {node: f"/dev/shm/gptckpt-bench-{tag}-node{node}" for node in "AB"}


def _remove(paths) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def run_overhead_row(model: str, row: str, iters: int, warmup: int, workdir: str) -> dict:
    """One two-node run of ``row``: the logging rank's gaps between iterations, its summary lines."""
    base = os.path.join(workdir, "overhead", uuid.uuid4().hex[:8])
    hosts = _host_dirs(uuid.uuid4().hex[:8])
    metrics = os.path.join(base, "metrics.jsonl")
    extra = list(OVERHEAD_ROWS[row])
    if extra:
        extra += ["--save", os.path.join(base, "l2")]
    args = [*OVERHEAD_MODELS[model], "--train-iters", str(warmup + iters), "--log-interval", "1",
            "--metrics-file", metrics, *extra]
    try:
        codes, text = run_two_node_trainer(args, [["--ckpt-host-dir", h] for h in hosts.values()],
                                           os.path.join(base, "logs"), "run", timeout_s=1800)
        if codes != [0, 0]:
            raise RuntimeError(f"{model} / {row}: exit codes {codes}; logs in {base}/logs:\n{text[-3000:]}")
        stamps = [record["time"] for record in read_metrics_file(metrics).iterations]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
        summary = [line.rstrip() for line in text.splitlines() if line.startswith(SUMMARY_PREFIXES)]
    finally:
        _remove(hosts.values())
    shutil.rmtree(base, ignore_errors=True)
    return {"times": gaps, "summary": summary}


def part_overhead(workdir: str, rounds: int, iters: dict[str, int], warmup: int, models: list[str]) -> None:
    """Interleaved rounds of every row of :data:`OVERHEAD_ROWS` per model."""
    rows = list(OVERHEAD_ROWS)
    for model in models:
        times = {row: [] for row in rows}
        for r in range(rounds):
            for row in (rows if r % 2 == 0 else rows[::-1]):
                out = run_overhead_row(model, row, iters[model], warmup, workdir)
                times[row] += out["times"]
                print(f"  {model}, round {r + 1}: {row}: median {1000 * statistics.median(out['times']):.1f} ms/it",
                      flush=True)
                for line in out["summary"]:
                    print(f"      {line}", flush=True)
        base = statistics.median(times["none"])
        alone = statistics.median(times["L0 every iteration"])
        print(f"\n## Overhead, {model} model: two nodes x 1 rank (DP2), OMP_NUM_THREADS=1, {rounds} interleaved rounds "
              f"of {iters[model]} iterations (after {warmup})\n")
        print("| setting | median ms/iteration | vs none | vs L0 alone |\n|---|---|---|---|")
        for row, values in times.items():
            med = statistics.median(values)
            print(f"| {row} | {1000 * med:.1f} | {100 * (med / base - 1):+.1f}% | {100 * (med / alone - 1):+.1f}% |")
        print(flush=True)


LOADED = re.compile(r"> loaded iteration (\d+) from (.+?) \(([\d.]+) MB on the logging rank, ([\d.]+) s\)")
STAGED = re.compile(r"staged from host memory in ([\d.]+) s \(([\d.]+) MB sent between nodes")


def _restart(name: str, save: str, hosts: dict[str, str], base: str) -> dict:
    """A two-node restart of the killed run (the same settings), trained to its end."""
    metrics = os.path.join(base, f"{name}.jsonl")
    args = [*RECOVERY_MODEL, *RECOVERY_CKPT, "--save", save, "--load", save, "--train-iters", str(TRAIN_ITERS),
            "--metrics-file", metrics]
    launched = time.time()
    codes, text = run_two_node_trainer(args, [["--ckpt-host-dir", h] for h in hosts.values()],
                                       os.path.join(base, "logs"), name, nproc_per_node=2, timeout_s=1200)
    if codes != [0, 0]:
        raise RuntimeError(f"restart {name}: exit codes {codes}; logs in {base}/logs:\n{text[-3000:]}")
    loaded, staged = LOADED.search(text), STAGED.search(text)
    if loaded is None:
        raise RuntimeError(f"restart {name} did not load a checkpoint:\n{text[-3000:]}")
    records = read_metrics_file(metrics).iterations
    return {"iteration": int(loaded.group(1)), "path": loaded.group(2), "mb": float(loaded.group(3)),
            "load_s": float(loaded.group(4)), "staged_s": float(staged.group(1)) if staged else None,
            "network_mb": float(staged.group(2)) if staged else 0.0,
            "first_iteration_s": records[0]["time"] - launched if records else float("nan"),
            "back_s": next((r["time"] - launched for r in records if r["iteration"] == KILL_AT), float("nan")),
            "notes": [line for line in text.splitlines() if line.startswith("> checkpoint:") or
                      line.startswith("> loaded")]}


def part_recovery(workdir: str, rounds: int) -> None:
    base = os.path.join(workdir, "recovery")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    save = os.path.join(base, "ckpt")
    hosts = _host_dirs(uuid.uuid4().hex[:8])
    kept = os.path.join(base, "kept")
    try:
        args = [*RECOVERY_MODEL, *RECOVERY_CKPT, "--save", save, "--train-iters", str(TRAIN_ITERS)]
        codes, text = run_two_node_trainer(args, [["--ckpt-host-dir", h] for h in hosts.values()],
                                           os.path.join(base, "logs"), "killed", nproc_per_node=2,
                                           env={"GPT_CKPT_FAULT": f"iteration:kill:{KILL_AT}",
                                                "GPT_CKPT_HOLD": "request"}, timeout_s=1200)
        if 0 in codes:
            raise RuntimeError(f"the run to kill was not killed: exit codes {codes}\n{text[-3000:]}")
        for node, host in hosts.items():
            shutil.copytree(host, os.path.join(kept, node), symlinks=True)
        shutil.copytree(save, os.path.join(kept, "ckpt"), symlinks=True)
        cases = {"node B replaced: from memory": ["B"], "every node's host memory gone: from L2": ["A", "B"]}
        results = {case: [] for case in cases}
        for r in range(rounds):
            for case in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                _remove([*hosts.values(), save])
                for node, host in hosts.items():
                    shutil.copytree(os.path.join(kept, node), host, symlinks=True)
                shutil.copytree(os.path.join(kept, "ckpt"), save, symlinks=True)
                _remove(hosts[node] for node in cases[case])
                drop_cache(save)
                out = _restart(f"r{r}-{case.split()[0]}{len(cases[case])}", save, hosts, base)
                results[case].append(out)
                print(f"  round {r + 1}: {case}: loaded iteration {out['iteration']} from {out['path']} in "
                      f"{out['load_s']:.2f} s ({out['mb']:.1f} MB on the logging rank)"
                      + (f", staged in {out['staged_s']:.2f} s, {out['network_mb']:.1f} MB between nodes"
                         if out["staged_s"] is not None else "")
                      + f"; first iteration {out['first_iteration_s']:.1f} s after launch, back at {KILL_AT} "
                        f"after {out['back_s']:.1f} s", flush=True)
                for line in out["notes"]:
                    print(f"      {line}", flush=True)
        print(f"\n## Recovery after a lost node: TP2xDP2 on two nodes x 2 ranks, killed after iteration {KILL_AT}, "
              f"{rounds} interleaved rounds (medians)\n")
        print("| restart | resumed at | staged from memory | load | MB read from --save (logging rank) | "
              f"MB sent between nodes | launch to first iteration | launch to iteration {KILL_AT} done |\n"
              "|---|---|---|---|---|---|---|---|")
        for case, outs in results.items():
            med = lambda key: statistics.median(o[key] for o in outs)  # noqa: E731
            memory = outs[0]["staged_s"] is not None
            print(f"| {case} | {outs[0]['iteration']} | {med('staged_s'):.2f} s |" if memory else
                  f"| {case} | {outs[0]['iteration']} | - |", end="")
            print(f" {med('load_s'):.2f} s | {0.0 if memory else med('mb'):.1f} | {med('network_mb'):.1f} | "
                  f"{med('first_iteration_s'):.1f} s | {med('back_s'):.1f} s |")
    finally:
        _remove(hosts.values())
        shutil.rmtree(base, ignore_errors=True)
