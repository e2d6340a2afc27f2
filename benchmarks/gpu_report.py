"""The GPU bench's markdown report: what the runs measured, rewritten after every step."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field

from benchmarks.engine_summary import engine_summary
from benchmarks.gpu_hardware import D2H_BYTES
from benchmarks.gpu_plan import Plan, all_runs
from benchmarks.gpu_runs import RunResult
from benchmarks.gpu_sections import (THROUGHPUT_HEADER, engine_section, equivalence_section, failure_block, fmt,
                                     resume_section, throughput_row)
from benchmarks.gpu_shapes import MATMUL_N, MFU_FORMULA, state_bytes_estimate


@dataclass
class Results:
    plan: Plan
    machine: list[str]
    equivalence: tuple[RunResult, RunResult] | None = None
    resume: RunResult | None = None
    medium: list[RunResult] = field(default_factory=list)
    large: RunResult | None = None
    large_note: str | None = None
    hardware: dict | None = None
    hardware_note: str | None = None
    started: str = ""


def render(res: Results) -> str:
    plan = res.plan
    first = plan.warmup + 1
    peak = res.hardware.get("matmul_tflops") if res.hardware else None
    lines = ["# The trainer on a GPU: CPU/GPU equivalence, throughput, checkpoint cost", "",
             f"Started {res.started} UTC: `python3 scripts/bench_trainer_gpu.py{' --smoke' if plan.smoke else ''}`"
             + (" (on the CPU with the tiny model everywhere: tests this script, not a GPU)" if plan.smoke else ""), "",
             "## Machine", "", *[f"- {m}" for m in res.machine], ""]
    if res.hardware:
        lines.append(f"- bf16 {MATMUL_N}^3 matmul peak (3 warm-ups, best of 3 x 10 timed): **{peak:.0f} TFLOP/s** "
                     f"(trials {', '.join(f'{t:.0f}' for t in res.hardware['matmul_tflops_trials'])})")
        lines.append("")
    lines += ["## Commands", "", "```"]
    lines += [f"# {s.key}: {s.title}\n{s.display()}" for s in all_runs(plan)]
    lines += ["# c: bf16 matmul peak and device-to-host copies, in a process of its own",
              "python scripts/bench_trainer_gpu.py --part hardware --json FILE", "```", ""]

    if res.equivalence:
        section, _ = equivalence_section(*res.equivalence, plan.smoke)
        lines += section

    if res.resume is not None and res.equivalence:
        lines += resume_section(res.equivalence[0], res.resume, plan.resume_from, plan.smoke)[0]

    if res.medium:
        plain = res.medium[0]
        engine = res.medium[1] if len(res.medium) > 1 else None
        lines += [f"## b. {plain.spec.shape.label}: throughput and the engine's cost", "",
                  f"bf16, distributed optimizer, micro-batch {plain.spec.micro_batch}, global batch "
                  f"{plain.spec.global_batch} x {plain.spec.shape.config.seq_length} tokens, mock data; median over "
                  f"iterations {first}..{max(plain.parsed.iteration_ms, default=first)} (the first {plan.warmup} warm up). "
                  f"{MFU_FORMULA}.", "", *THROUGHPUT_HEADER]
        row, base_ms = throughput_row("(i) no checkpointing", plain, first, peak, None)
        lines.append(row)
        if engine is not None:
            every = engine.spec.args[engine.spec.args.index("--ckpt-local-interval") + 1]
            row, _ = throughput_row(f"(ii) L0 every iteration + L1 every {every} iterations", engine, first, peak, base_ms)
            lines.append(row)
        if peak is None:
            lines.append("")
            lines.append("MFU n/a: no measured matmul peak" + (" (--smoke)" if plan.smoke else ""))
        lines.append("")
        for r in res.medium:
            if not r.ok:
                lines += failure_block(r)
        if plain.parsed.summary:
            lines += ["(i) end-of-run lines:", "", "```", *plain.parsed.summary, "```", ""]
        if engine is not None:
            lines += ["### (ii) the engine", ""] + engine_section(engine, plain)

    lines += ["## c. Device-to-host bandwidth", ""]
    if res.hardware:
        lines += [f"{D2H_BYTES / 1e9:.0f} GB from the GPU, 1 warm-up then 3 copies timed with a device synchronize:", "",
                  "| host memory | GB/s |", "|---|---|"]
        lines += [f"| {name} | {gbps:.1f} |" for name, gbps in res.hardware.get("d2h_gbps", {}).items()]
        if res.hardware.get("shm_error"):
            lines.append(f"| /dev/shm, cudaHostRegister | failed: {res.hardware['shm_error']} |")
        lines.append("")
    else:
        lines += [res.hardware_note or "not measured", ""]
    engine = res.medium[1] if len(res.medium) > 1 else None
    if engine is not None and engine.stats is not None:
        e = engine_summary(engine.stats, state_bytes_estimate(engine.spec.shape.config, engine.spec.bf16))
        lines += [f"The trainer's own snapshots (b ii): {fmt(e.copy_gbps, '.1f', ' GB/s')} from `request` to landed "
                  "(includes waiting for the step's kernels; see b)." if e.copy_gbps is not None else
                  "The trainer's stats give no snapshot copy time (copy_seconds).", ""]

    if plan.large is not None or res.large_note:
        lines += ["## d. 1.3B", ""]
        if res.large is not None:
            r = res.large
            lines += [f"bf16, distributed optimizer, micro-batch {r.spec.micro_batch}, global batch {r.spec.global_batch} "
                      f"x {r.spec.shape.config.seq_length} tokens, no checkpointing; median over iterations {first}..", "",
                      *THROUGHPUT_HEADER, throughput_row(r.spec.shape.label, r, first, peak, None)[0], ""]
            if not r.ok:
                lines += failure_block(r)
            if r.parsed.summary:
                lines += ["```", *r.parsed.summary, "```", ""]
        else:
            lines += [res.large_note or "not run", ""]

    describes = [(r.spec.key, r.parsed.describe) for r in all_results(res) if r.parsed.describe]
    if describes:
        lines += ["## What the trainer said it built", "", "```"]
        lines += [f"{key}: {text}" for key, text in describes]
        lines += ["```", ""]
    return "\n".join(lines)


def all_results(res: Results) -> list[RunResult]:
    out = list(res.equivalence or ()) + ([res.resume] if res.resume else []) + list(res.medium)
    return out + ([res.large] if res.large else [])


def machine_lines(smoke: bool) -> list[str]:
    lines = [f"host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"]
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            lines.append(f"megatron-core {version('megatron-core')}")
        except PackageNotFoundError:
            lines.append("megatron-core: not installed (the trainer runs will fail; see scripts/gpu_fetch_wheels.sh)")
    except ImportError:
        pass
    if shutil.which("nvidia-smi") and not smoke:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        lines.append(f"GPU: {query.stdout.strip() or query.stderr.strip()}")
    try:
        shm = shutil.disk_usage("/dev/shm")
        lines.append(f"/dev/shm: {shm.free / 1e9:.0f} GB free of {shm.total / 1e9:.0f} GB")
    except OSError:
        pass
    return lines


def write_report(res: Results, path: str | None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(render(res) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
