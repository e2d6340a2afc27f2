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
from benchmarks.gpu_sections import (
    THROUGHPUT_HEADER,
    equivalence_section,
    failure_block,
    fmt,
    pair_lines,
    resume_section,
    throughput_row,
)
from benchmarks.gpu_shapes import MATMUL_N, MFU_FORMULA, estimated_memory_gb, state_bytes_estimate


@dataclass
class Results:
    plan: Plan
    machine: list[str]
    equivalence: tuple[RunResult, RunResult] | None = None
    resume: RunResult | None = None
    medium: list[RunResult] = field(default_factory=list)
    large: RunResult | None = None
    large_note: str | None = None
    llama: list[RunResult] = field(default_factory=list)
    llama_note: str | None = None
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
        lines += [f"## b. {plain.spec.shape.label}: throughput and the engine's cost", "",
                  f"bf16, distributed optimizer, micro-batch {plain.spec.micro_batch}, global batch "
                  f"{plain.spec.global_batch} x {plain.spec.shape.config.seq_length} tokens, mock data; median over "
                  f"iterations {first}..{max(plain.parsed.iteration_ms, default=first)} (the first {plan.warmup} warm up). "
                  f"{MFU_FORMULA}.", ""]
        lines += pair_lines(res.medium, first, peak, plan.smoke)

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

    if plan.llama is not None or res.llama_note:
        lines += llama_section(res, first, peak)

    describes = [(r.spec.key, r.parsed.describe) for r in all_results(res) if r.parsed.describe]
    if describes:
        lines += ["## What the trainer said it built", "", "```"]
        lines += [f"{key}: {text}" for key, text in describes]
        lines += ["```", ""]
    return "\n".join(lines)


def llama_section(res: Results, first: int, peak: float | None) -> list[str]:
    """(e): the llama3-1B pair, the last runs of the plan (not run when the budget is spent)."""
    plan = res.plan
    shape = plan.llama[0].shape if plan.llama else None
    lines = [f"## e. {shape.label if shape else 'llama3-1B'}: throughput, peak GPU memory and the engine's cost", ""]
    if plan.llama is None:
        return lines + [res.llama_note or "not run", ""]
    spec = plan.llama[0]
    c = shape.config
    recompute = (spec.args[spec.args.index("--recompute-granularity") + 1]
                 if "--recompute-granularity" in spec.args else None)
    memory = estimated_memory_gb(c, spec.micro_batch, spec.bf16, recompute)
    built = [c.position_embedding_type == "rope" and "RoPE", c.normalization,
             c.swiglu and f"SwiGLU (ffn {c.ffn_hidden_size})",
             c.group_query_attention and f"grouped-query attention ({c.query_groups} key/value heads of "
                                         f"{c.num_attention_heads})",
             c.disable_bias_linear and "no biases",
             "untied embeddings" if c.untie_embeddings_and_output_weights else "tied embeddings"]
    lines += [f"{', '.join(b for b in built if b)}; bf16, distributed optimizer, "
              f"micro-batch {spec.micro_batch}, global batch {spec.global_batch} x {c.seq_length} tokens, mock data, "
              f"{recompute or 'no'} recomputation; median over iterations {first}.. (the first {plan.warmup} warm up). "
              "Estimated peak "
              f"~{memory:.0f} GB (`estimated_memory_gb`, which counts materialised attention scores that the sdpa "
              "backend does not keep); the measured peak is `torch.cuda.max_memory_allocated` (the metrics file's "
              "`peak_device_mib`). The pair runs last, only while the budget lasts.", ""]
    if not res.llama:
        return lines + ["not run (the bench had not reached it)", ""]
    return lines + pair_lines(res.llama, first, peak, plan.smoke)


def all_results(res: Results) -> list[RunResult]:
    out = list(res.equivalence or ()) + ([res.resume] if res.resume else []) + list(res.medium)
    return out + ([res.large] if res.large else []) + list(res.llama)


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
