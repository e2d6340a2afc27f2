"""The start-up bench: launch to the end of the first iteration of a job as users launch it, and
the flusher's start and CPU per GB written, in interleaved rounds (ratios within one run: this
machine is shared and noisy).

``startup``: a 2-process TP2 tiny GPT under torchrun, without checkpointing, with
``--async-save`` and its flusher forked from the template, and with ``--ckpt-flusher-start
interpreter`` (a fresh Python per flusher, as before the template). Launch-to-first-iteration is
the bench's launch time against the logging rank's ``first_iteration_end_unix``; the parts and the
flusher's figures are the metrics file's ``startup`` object.

``before-after``: launch to the first iteration's console line of another checkout (an earlier
commit, which has no ``startup`` record) against this one, with and without ``--async-save``.

``cpu-per-gb``: the host-bound model (``benchmarks/host_bound.py``: 16 layers x 128, versions of
~40 MB in ~590 small pieces) and a wide one (4 layers x 1024: ~620 MB in ~50 pieces of up to
~12 MB), one process, every version to disk: the flusher's CPU (its own process clock, start-up
apart) over the bytes it wrote. The two tell its cost per piece from its cost per byte. Each row
gives it twice: over the whole run (its first version's one-time work, the slot's file layout
and the level's first ``.metadata`` built from scratch, and what follows the last flush,
included), and in steady state, from the end of its first flush to the end of its last (each
flush's record holds the flusher's CPU clock then).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks.host_bound import HOST_BOUND_MODEL
from benchmarks.processes import PRETRAIN, REPO, LoggedProcess, job_env
from trainer import startup
from trainer.metrics_file import read_metrics_file

PARTS = (startup.INTERPRETER, startup.PROCESS_GROUPS, startup.MODEL, startup.ENGINE, startup.LOAD, startup.FIRST_ITERATION)

TINY_TP2 = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 --seq-length 32 "
            "--max-position-embeddings 32 --vocab-size 1024 --mock-data --micro-batch-size 2 --global-batch-size 4 "
            "--lr 1e-3 --tensor-model-parallel-size 2 --train-iters 3 --log-interval 1").split()
STARTUP_ROWS = {
    "none": [],
    "--async-save (template)": ["--async-save", "--save-interval", "1"],
    "--async-save (interpreter)": ["--async-save", "--save-interval", "1", "--ckpt-flusher-start", "interpreter"],
}


def _run(cmd_args: list[str], base: str, nproc: int, what: str) -> tuple[float, str]:
    """Run ``pretrain_gpt.py`` under torchrun; (its launch time, its metrics file)."""
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    metrics = os.path.join(base, "metrics.jsonl")
    env = job_env({"OMP_NUM_THREADS": "1", "GPT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", PRETRAIN,
           *cmd_args, "--metrics-file", metrics]
    launched = time.time()
    rc, _, _, text = LoggedProcess(cmd, env, os.path.join(base, "console.log"), 600).finish()
    if rc != 0:
        raise RuntimeError(f"{what}: pretrain_gpt.py failed:\n{text[-3000:]}")
    return launched, metrics


def run_startup(row: str, workdir: str) -> dict:
    base = os.path.join(workdir, "startup", str(list(STARTUP_ROWS).index(row)))
    extra = list(STARTUP_ROWS[row])
    if extra:
        extra += ["--save", os.path.join(base, "l2")]
    launched, metrics = _run(TINY_TP2 + extra, base, 2, f"start-up {row}")
    record = read_metrics_file(metrics).startup
    shutil.rmtree(base, ignore_errors=True)
    return {"launch": record["first_iteration_end_unix"] - launched, "own": record["seconds"],
            "parts": record["parts"], "flusher": record.get("flusher")}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def part_startup(workdir: str, rounds: int) -> list[str]:
    """Interleaved rounds of each row; a markdown table of medians."""
    results = {row: [] for row in STARTUP_ROWS}
    for r in range(rounds):
        for row in STARTUP_ROWS:
            results[row].append(run_startup(row, workdir))
            got = results[row][-1]
            print(f"  round {r + 1} {row}: launch to first iteration {got['launch']:.2f} s "
                  f"(the job's own count {got['own']:.2f} s)", flush=True)
    base = _median([x["launch"] for x in results["none"]])
    lines = ["| row | launch to first iteration (median) | vs none | interpreter and imports | process groups | "
             "model | engine | load | first iteration | flusher ready after | flusher start CPU | "
             "flusher unshared | first iteration waited |", "|" + "---|" * 13]
    for row, runs in results.items():
        launch = _median([x["launch"] for x in runs])
        parts = [_median([x["parts"][name] for x in runs if name in x["parts"]]) for name in PARTS]
        flusher = [x["flusher"] for x in runs if x["flusher"]]
        if flusher:
            fl = (f"{_median([f['ready_seconds'] for f in flusher]):.2f} s | "
                  f"{_median([f['cpu_seconds'] for f in flusher]):.2f} s | "
                  f"{_median([f['unshared_mib'] for f in flusher]):.0f} MiB | "
                  f"{_median([f['waited_seconds'] for f in flusher]):.2f} s")
        else:
            fl = "- | - | - | -"
        lines.append(f"| {row} | {launch:.2f} s | {launch - base:+.2f} s | "
                     + " | ".join("-" if p != p else f"{p:.2f} s" for p in parts) + f" | {fl} |")
    return lines


WIDE_MODEL = [*HOST_BOUND_MODEL]
WIDE_MODEL[WIDE_MODEL.index("--num-layers") + 1] = "4"
WIDE_MODEL[WIDE_MODEL.index("--hidden-size") + 1] = "1024"
WIDE_MODEL[WIDE_MODEL.index("--num-attention-heads") + 1] = "8"
MODELS = {"host-bound (16 x 128)": HOST_BOUND_MODEL, "wide (4 x 1024)": WIDE_MODEL}


def run_cpu_per_gb(start: str, iters: int, workdir: str, model: list[str] = HOST_BOUND_MODEL) -> dict:
    """One process, every version to L2; the flusher's CPU per GB written."""
    base = os.path.join(workdir, "cpu-per-gb", start)
    args = model + ["--train-iters", str(iters), "--async-save", "--save-interval", "1",
                    "--ckpt-flusher-start", start, "--save", os.path.join(base, "l2")]
    _, metrics = _run(args, base, 1, f"cpu-per-gb {start}")
    summary = read_metrics_file(metrics).summary["checkpoint"]
    shutil.rmtree(base, ignore_errors=True)
    rank = summary["ranks"][0]
    done = [f for f in rank["flushes"] if f.get("error") is None]
    written = sum(f["bytes"] for f in done)
    steady_cpu = done[-1]["flusher_cpu_seconds"] - done[0]["flusher_cpu_seconds"] if len(done) > 1 else 0.0
    steady_gb = sum(f["bytes"] for f in done[1:]) / 1e9
    return {"cpu": rank["flusher_cpu_seconds"], "gb": written / 1e9, "versions": len(done),
            "steady": steady_cpu / max(steady_gb, 1e-9), "steady_ms": 1000 * steady_cpu / max(len(done) - 1, 1)}


def part_cpu_per_gb(workdir: str, rounds: int, iters: int) -> list[str]:
    rows = [(model, "template") for model in MODELS] + [(next(iter(MODELS)), "interpreter")]
    results: dict[tuple[str, str], list[dict]] = {row: [] for row in rows}
    for r in range(rounds):
        for model, start in rows:
            got = run_cpu_per_gb(start, iters, workdir, MODELS[model])
            results[(model, start)].append(got)
            print(f"  round {r + 1} {model}, {start}: {got['cpu']:.2f} CPU-s for {got['gb']:.3f} GB in "
                  f"{got['versions']} versions = {got['cpu'] / max(got['gb'], 1e-9):.2f} CPU-s/GB "
                  f"(steady state {got['steady']:.2f})", flush=True)
    lines = ["| model | flusher start | versions written | GB written | flusher CPU | CPU-s per GB (median) | "
             "ms of CPU per version | steady state: CPU-s per GB | steady state: ms per version |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, start), runs in results.items():
        per_gb = _median([x["cpu"] / max(x["gb"], 1e-9) for x in runs])
        per_version = _median([1000 * x["cpu"] / max(x["versions"], 1) for x in runs])
        lines.append(f"| {model} | {start} | {_median([x['versions'] for x in runs]):.0f} | "
                     f"{_median([x['gb'] for x in runs]):.3f} | {_median([x['cpu'] for x in runs]):.2f} s | "
                     f"{per_gb:.2f} | {per_version:.1f} | {_median([x['steady'] for x in runs]):.2f} | "
                     f"{_median([x['steady_ms'] for x in runs]):.1f} |")
    return lines


def launch_to_first_line(tree: str, async_save: bool, workdir: str) -> float | None:
    """Seconds from launching ``tree``'s ``pretrain_gpt.py`` (2-process TP2 tiny GPT) under torchrun
    to its first iteration's console line: what a tree without the ``startup`` record (an older
    commit) can be timed by, read as its console prints."""
    save = os.path.join(workdir, "before-after", "l2")
    shutil.rmtree(os.path.dirname(save), ignore_errors=True)
    extra = ["--async-save", "--save-interval", "1", "--save", save] if async_save else []
    env = job_env({"OMP_NUM_THREADS": "1", "GPT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(tree, "scripts", "pretrain_gpt.py"), *TINY_TP2, *extra]
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tree)
    first = None
    for line in proc.stdout:
        if first is None and line.lstrip().startswith("iteration ") and "/" in line:
            first = time.time() - launched
    proc.wait(timeout=600)
    shutil.rmtree(os.path.dirname(save), ignore_errors=True)
    return first if proc.returncode == 0 else None


def part_before_after(workdir: str, rounds: int, old_tree: str) -> list[str]:
    """``old_tree`` (a checkout of an earlier commit) against this one, interleaved rounds."""
    trees = {"before (" + os.path.basename(os.path.abspath(old_tree)) + ")": old_tree, "this tree": REPO}
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(rounds):
        for name, tree in trees.items():
            for async_save in (False, True):
                got = launch_to_first_line(tree, async_save, workdir)
                print(f"  round {r + 1} {name} {'--async-save' if async_save else 'none'}: {got}", flush=True)
                if got is not None:
                    times.setdefault((name, async_save), []).append(got)
    lines = ["| tree | no checkpointing | --async-save | what --async-save adds |", "|---|---|---|---|"]
    for name in trees:
        plain, asyn = _median(times.get((name, False), [])), _median(times.get((name, True), []))
        lines.append(f"| {name} | {plain:.2f} s | {asyn:.2f} s | {asyn - plain:+.2f} s |")
    return lines
