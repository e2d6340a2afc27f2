"""The GPU bench's report sections: each returns its markdown lines (and, for the checks,
whether they passed), from the runs' results."""

from __future__ import annotations

import statistics

from benchmarks.engine_summary import engine_summary
from benchmarks.gpu_runs import RunResult
from benchmarks.gpu_shapes import state_bytes_estimate, throughput
from benchmarks.trainer_output import median_ms

LOSS_TOLERANCE = 1e-4
# The device the trainer reports (its metrics file's summary) must be a GPU for the GPU leg to
# prove anything: a trainer that silently fell back to the CPU would match the CPU leg trivially.
GPU_DEVICE_TYPE = "cuda"
CPU_DEVICE_TYPE = "cpu"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def failure_block(result: RunResult) -> list[str]:
    lines = [f"**{result.spec.key} did not complete: {result.failure()}.**", ""]
    if result.tail:
        lines += ["Tail of its log:", "", "```", result.tail, "```", ""]
    return lines


def equivalence_section(cpu: RunResult, gpu: RunResult, smoke: bool) -> tuple[list[str], bool]:
    lines = ["## a. CPU vs GPU: the same losses", ""]
    for r in (cpu, gpu):
        if not r.ok:
            lines += failure_block(r)
    if not (cpu.ok and gpu.ok):
        return lines + ["Result: **FAIL** (a run did not complete)", ""], False
    expected_gpu = CPU_DEVICE_TYPE if smoke else GPU_DEVICE_TYPE
    devices_ok = ((cpu.parsed.device or "").startswith(CPU_DEVICE_TYPE)
                  and (gpu.parsed.device or "").startswith(expected_gpu))
    lines += [f"Devices as the trainer reported them: CPU leg `{cpu.parsed.device}`, GPU leg `{gpu.parsed.device}`"
              + (" (smoke: both legs on the CPU)" if smoke else ""), "",
              "| iteration | CPU lm loss | GPU lm loss | abs difference |", "|---|---|---|---|"]
    its = sorted(set(cpu.parsed.loss) | set(gpu.parsed.loss))
    worst = 0.0
    complete = bool(its)
    for it in its:
        a, b = cpu.parsed.loss.get(it), gpu.parsed.loss.get(it)
        if a is None or b is None:
            complete = False
            lines.append(f"| {it} | {fmt(a, '.6f')} | {fmt(b, '.6f')} | missing |")
            continue
        diff = abs(a - b)
        if diff != diff:  # NaN
            diff = float("inf")
        worst = max(worst, diff)
        lines.append(f"| {it} | {a:.6f} | {b:.6f} | {diff:.2e} |")
    passed = complete and devices_ok and worst <= LOSS_TOLERANCE
    reasons = []
    if not devices_ok:
        reasons.append(f"the GPU leg ran on `{gpu.parsed.device}`, expected `{expected_gpu}`")
    if not complete:
        reasons.append("iterations missing from a metrics file")
    lines += ["", f"Max abs difference {worst:.2e} (tolerance {LOSS_TOLERANCE:g}; the losses of the metrics files, "
                  f"unrounded). Result: **{'PASS' if passed else 'FAIL'}**" + (f" ({'; '.join(reasons)})" if reasons else ""),
              "", f"Median iteration time: CPU {fmt(median_ms(cpu.parsed, 2), '.1f', ' ms')}, "
                  f"GPU {fmt(median_ms(gpu.parsed, 2), '.1f', ' ms')} (iterations 2.., tiny model: start-up bound).", ""]
    return lines, passed


# What the trainer says when RNG states cannot cross devices (trainer/checkpoint_state.py).
RNG_NOT_RESTORED = "RNG states (device generator, tensor-parallel tracker) were not restored"


def resume_section(cpu: RunResult, resume: RunResult, resume_from: int, smoke: bool) -> tuple[list[str], bool]:
    """The CPU checkpoint resumed on the GPU: the losses after it are the CPU run's (no dropout),
    and the trainer says that the device RNG states were not restored."""
    lines = [f"## a2. A CPU checkpoint (iteration {resume_from}) resumed on the GPU", ""]
    if not (cpu.ok and resume.ok):
        for r in (cpu, resume):
            if not r.ok:
                lines += failure_block(r)
        return lines + ["Result: **FAIL** (a run did not complete)", ""], False
    note = [line for line in resume.parsed.checkpoint_notes if "not restored" in line]
    said = any(RNG_NOT_RESTORED in line for line in note)
    its = sorted(resume.parsed.loss)
    complete = bool(its) and its[0] == resume_from + 1 and all(it in cpu.parsed.loss for it in its)
    worst = max((abs(resume.parsed.loss[it] - cpu.parsed.loss[it]) for it in its if it in cpu.parsed.loss), default=0.0)
    if worst != worst:
        worst = float("inf")
    lines += ["| iteration | CPU, uninterrupted | GPU, resumed | abs difference |", "|---|---|---|---|"]
    lines += [f"| {it} | {fmt(cpu.parsed.loss.get(it), '.6f')} | {resume.parsed.loss[it]:.6f} | "
              f"{fmt(abs(resume.parsed.loss[it] - cpu.parsed.loss[it]) if it in cpu.parsed.loss else None, '.2e')} |"
              for it in its]
    passed = complete and worst <= LOSS_TOLERANCE and (said or smoke)
    lines += ["", f"The trainer said: `{note[0] if note else 'nothing about RNG states'}`"
              + (" (smoke: the same device, so nothing to say)" if smoke else ""), "",
              f"Max abs difference {worst:.2e} (tolerance {LOSS_TOLERANCE:g}). Result: **{'PASS' if passed else 'FAIL'}**", ""]
    return lines, passed


def peak_memory(result: RunResult) -> str:
    """The run's peak allocated GPU memory (the metrics file's ``peak_device_mib``, the largest
    rank's), or n/a (on the CPU, or the run did not reach its end)."""
    peaks = result.parsed.peak_device_mib
    return f"{max(peaks) / 1024:.1f} GiB" if peaks else "n/a"


def throughput_row(label: str, result: RunResult, first: int, peak: float | None, base_ms: float | None) -> tuple[str, float | None]:
    ms = median_ms(result.parsed, first)
    # A run cut short by its timeout still measured the iterations it logged.
    if not result.ok and not (result.timed_out and ms is not None):
        return f"| {label} | {result.failure()} | | | | | | |", None
    if ms is None:
        return f"| {label} | no iteration {first}.. logged | | | | | | |", None
    if not result.ok:
        label += f" ({result.failure()}; {sum(1 for it in result.parsed.iteration_ms if it >= first)} iterations measured)"
    t = throughput(result.spec.shape.config, result.spec.global_batch, ms, peak)
    overhead = f"{100 * (ms / base_ms - 1):+.1f}%" if base_ms else "-"
    return (f"| {label} | {_params(result.spec.shape.parameters)} | {ms:.1f} ms | {t.tokens_per_s:,.0f} | "
            f"{t.model_tflops:.1f} | {fmt(None if t.mfu is None else 100 * t.mfu, '.1f', '%')} | {overhead} | "
            f"{peak_memory(result)} |"), ms


THROUGHPUT_HEADER = ["| run | parameters | median iteration | tokens/s | model TFLOP/s | MFU | iteration time vs (i) "
                     "| peak GPU memory |", "|---|---|---|---|---|---|---|---|"]


def pair_lines(runs: list[RunResult], first: int, peak: float | None, smoke: bool) -> list[str]:
    """A checkpoint pair's table ((i) without checkpointing, (ii) with the engine), the ratio of
    their median iteration times, what went wrong, and the engine's counters."""
    plain = runs[0]
    engine = runs[1] if len(runs) > 1 else None
    lines = list(THROUGHPUT_HEADER)
    row, base_ms = throughput_row("(i) no checkpointing", plain, first, peak, None)
    lines.append(row)
    engine_ms = None
    if engine is not None:
        every = engine.spec.args[engine.spec.args.index("--ckpt-local-interval") + 1]
        row, engine_ms = throughput_row(f"(ii) L0 every iteration + L1 every {every} iterations", engine, first, peak,
                                        base_ms)
        lines.append(row)
    lines.append("")
    if base_ms and engine_ms:
        lines += [f"Median iteration time (ii) / (i): **{engine_ms / base_ms:.3f}** ({engine_ms:.1f} / {base_ms:.1f} ms).",
                  ""]
    if peak is None:
        lines += ["MFU n/a: no measured matmul peak" + (" (--smoke)" if smoke else ""), ""]
    for r in runs:
        if not r.ok and not r.skipped:
            lines += failure_block(r)
    if plain.parsed.summary:
        lines += ["(i) end-of-run lines:", "", "```", *plain.parsed.summary, "```", ""]
    if engine is not None and not engine.skipped:
        lines += ["### (ii) the engine", ""] + engine_section(engine, plain)
    return lines


def engine_section(result: RunResult, plain: RunResult | None) -> list[str]:
    lines = []
    if result.stats is None:
        return [f"No engine counters: `{result.spec.metrics_path}` has no checkpointing summary"
                + (" (the run did not complete)." if not result.ok else "."), ""]
    e = engine_summary(result.stats, state_bytes_estimate(result.spec.shape.config, result.spec.bf16))
    gb = fmt(e.state_gb, ".2f", " GB") + (" (estimated from the parameter count: the stats have no state_bytes)"
                                           if e.state_gb_estimated else "")
    train_s = sum(result.parsed.iteration_ms.values()) / 1000
    lines += [f"Engine counters (the metrics file's summary, rank 0), snapshot size {gb}:", "",
              f"- stall (fence waits and waits for a free slot; on a GPU timed on the device): {e.stall_ms:.1f} ms in all"
              + (f", {100 * e.stall_ms / 1000 / train_s:.2f}% of {train_s:.1f} s of training" if train_s else "")
              + f"; {e.fence_waits} fences reached an unfinished copy; {e.snapshots} snapshots (L0)",
              "- `request` blocked: " + (f"{e.request_ms:.1f} ms in all over {e.requests} requests, "
                                          f"{fmt(e.blocked_ms_per_gb_per_request, '.3f')} ms per GB per request"
                                          if e.request_ms is not None and e.requests else
                                          "n/a (this trainer's stats have no request_seconds/requests)")]
    if e.copy_gbps is not None:
        lines.append(f"- snapshot rate: {e.copy_gbps:.1f} GB/s (snapshot bytes / mean time from `request` to the bytes "
                     "landing in host memory, which includes the GPU finishing the step: a lower bound of the copy rate)")
    for level in sorted(e.flushes):
        f = e.flushes[level]
        secs = f["seconds"]
        rate = f["bytes"] / sum(secs) / 1e9 if secs and sum(secs) else None
        lines.append(f"- {level} flushes: {f['ok']} done ({f['bytes'] / 1e9:.2f} GB, "
                     f"{fmt(statistics.mean(secs) if secs else None, '.2f', ' s')} each, {fmt(rate, '.2f', ' GB/s')}), "
                     f"{f['failed']} failed, {e.skipped.get(level, 0)} superseded")
    lines.append("")
    if result.parsed.summary:
        lines += ["End-of-run lines the trainer printed:", "", "```", *result.parsed.summary, "```", ""]
    if result.parsed.iteration_ms:
        base = plain.parsed.iteration_ms if plain is not None else {}
        lines += ["| iteration | (i) ms | (ii) ms | (ii) stall ms |", "|---|---|---|---|"]
        for it in sorted(result.parsed.iteration_ms):
            lines.append(f"| {it} | {fmt(base.get(it), '.1f')} | {result.parsed.iteration_ms[it]:.1f} | "
                         f"{e.stall_by_iteration_ms.get(it, 0.0):.1f} |")
        lines.append("")
    return lines
