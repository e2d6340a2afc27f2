"""The CPU bench's ``overhead`` part: interleaved rounds of K iterations per method, each method
of a round in a process of its own (so that each can have its own OpenMP wait policy,
``method@passive``), checkpointing every iteration; overhead against ``none``, the time the
training thread was blocked, and each thread's CPU."""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks.ckpt_state import build_trainer, state_bytes
from benchmarks.methods import METHODS, CopyFloor, EngineMethod, label, split_spec
from benchmarks.proc_cpu import thread_cpu_seconds
from benchmarks.processes import BENCH_CHECKPOINT, child_json, job_env
from checkpointing.engine import idle_and_steal, machine_cpu_times

DEFAULT_METHODS = ("none,none@passive,engine-l0,engine-l0@passive,engine-zc-l0,engine-zc-l0@passive,engine-disk,"
                   "engine-zc-disk,engine-zc-disk@passive,checkfreq,dcp-async-staged,dcp-async-thread")


def run_child(spec: str, iters: int, warmup: int, workdir: str) -> dict:
    """One method in a fresh process: OpenMP reads its wait policy once, at load."""
    name, policy = split_spec(spec)
    env = job_env({"OMP_WAIT_POLICY": policy} if policy else {}, drop=("OMP_WAIT_POLICY",))
    cmd = [sys.executable, BENCH_CHECKPOINT, "--child", name, "--iters", str(iters), "--warmup", str(warmup),
           "--workdir", workdir]
    return child_json(cmd, env, f"bench child {spec}")


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
            machine_before = machine_cpu_times()
            flusher_before = _flusher_cpu(m)
        started = time.perf_counter()
        trainer.train_step()
        m.checkpoint(trainer.iteration)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    cpu_after = thread_cpu_seconds()
    flusher_after = _flusher_cpu(m)
    idle, steal = idle_and_steal(machine_before, machine_cpu_times()) or (float("nan"), float("nan"))
    m.stop()
    cpu = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) / iters for name in cpu_after}
    if flusher_after is not None:
        cpu["flusher process"] = (flusher_after - flusher_before) / iters
    result = {"times": times, "bytes": state_bytes(trainer), "cpu": {k: v for k, v in cpu.items() if v >= 0.005},
              "steal": steal, "idle": idle}
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
    from checkpointing.engine import control_block

    return method.engine.block[control_block.CPU_NS] / 1e9


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
        policy = split_spec(spec)[1]
        same = "none" + (f"@{policy.lower()}" if policy else "")
        vs_same = f"{100 * (med / statistics.median(times[same]) - 1):+.1f}%" if same in times else "-"
        print(f"| {label(spec)} | {med:.3f} | {100 * (med / base - 1):+.1f}% | {vs_same} | {ms:.2f} | "
              f"{ms / (nbytes / 1e9):.2f} | {disk} |")
