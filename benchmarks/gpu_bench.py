"""The GPU bench (``scripts/bench_trainer_gpu.py``): the real trainer on one GPU, step by step,
the report rewritten after every step so that a run killed from outside still leaves what it had."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import sys
import tempfile

from benchmarks.gpu_hardware import D2H_BYTES
from benchmarks.gpu_plan import STARTUP_S, BenchError, Plan, all_runs, check_commands, make_plan
from benchmarks.gpu_report import Results, all_results, machine_lines, render, write_report
from benchmarks.gpu_runs import free_run_space, run_hardware, run_one, run_pair_concurrently
from benchmarks.gpu_sections import equivalence_section, resume_section
from benchmarks.gpu_shapes import MATMUL_N
from benchmarks.processes import Budget, Terminated, kill_running, raise_terminated


def print_dry_run(plan: Plan, checked: list[str], budget_s: float) -> int:
    """What ``--dry-run`` prints: every command as the trainer's parser took it, and the GPU time
    the plan expects."""
    print(f"bench_trainer_gpu.py --dry-run: {len(checked)} trainer commands parse with the trainer's own parser")
    for line in checked:
        print(line)
    print(f"plus: python scripts/bench_trainer_gpu.py --part hardware (bf16 {MATMUL_N}^3 matmul peak, "
          f"{D2H_BYTES / 1e9:.0f} GB device-to-host copies)")
    required = [s for s in all_runs(plan)[1:] if not s.optional]  # a-cpu runs beside a-gpu
    expected = sum(s.estimate_s for s in required) + STARTUP_S / 2 + 10
    optional = [s for s in all_runs(plan) if s.optional]
    print(f"expected GPU time ~{expected:.0f} s on an H200, budget {budget_s:.0f} s"
          + (f"; then, while the budget lasts, the optional {', '.join(s.key for s in optional)} "
             f"(~{sum(s.estimate_s for s in optional):.0f} s)" if optional else ""))
    return 0


def bench(out: str | None, workdir: str | None, budget_s: float, with_large: bool, keep: bool, dry_run: bool,
          smoke: bool, with_llama: bool = True) -> int:
    """Plan, check and (unless ``dry_run``) make every run; the exit code: 0 when the checks passed
    and every run completed."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    workdir = workdir or (os.path.join(tempfile.gettempdir(), "bench-trainer-gpu-dry-run") if dry_run
                          else tempfile.mkdtemp(prefix="bench-trainer-gpu-"))
    plan = make_plan(workdir, smoke, with_large, with_llama)
    check_note = None
    try:
        checked = check_commands(plan)
    except (BenchError, ImportError) as error:
        if dry_run or smoke:
            print(f"bench_trainer_gpu.py: {error}", file=sys.stderr)
            return 2
        # On the lent GPU machine every run is worth trying (its time is scarce, and the CPU
        # dry run passed): a run that cannot start is reported with its log.
        check_note = f"the pre-flight check of the commands failed: {error}"
        print(f"bench_trainer_gpu.py: WARNING: {check_note}; running anyway", flush=True)
    if dry_run:
        return print_dry_run(plan, checked, budget_s)

    if smoke:
        # Small and polite on a shared CPU machine: one thread per process.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    budget = Budget(budget_s)
    res = Results(plan, machine_lines(smoke) + ([f"WARNING: {check_note}"] if check_note else []), started=started)
    print(f"bench_trainer_gpu.py: work directory {workdir}, budget {budget_s:.0f} s", flush=True)
    write_report(res, out)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        print("== a. CPU vs GPU losses (both legs at once)", flush=True)
        res.equivalence = run_pair_concurrently(plan.equivalence, logdir, budget)
        write_report(res, out)
        print("== a2. the CPU leg's checkpoint resumed on the GPU", flush=True)
        res.resume = run_one(plan.resume, logdir, budget)
        write_report(res, out)
        if smoke:
            res.hardware_note = "skipped (--smoke: no GPU): the matmul peak and the device-to-host copies need CUDA"
        else:
            print("== c. bf16 matmul peak and device-to-host bandwidth", flush=True)
            res.hardware, res.hardware_note = run_hardware(logdir, budget)
        write_report(res, out)
        print(f"== b. {plan.medium[0].shape.label}: without and with the checkpoint engine", flush=True)
        for spec in plan.medium:
            res.medium.append(run_one(spec, logdir, budget))
            write_report(res, out)
        if plan.large is not None:
            print(f"== d. {plan.large.shape.label}", flush=True)
            res.large = run_one(plan.large, logdir, budget)
        else:
            res.large_note = "not run (--no-1p3b)"
        write_report(res, out)
        if plan.llama is not None:
            print(f"== e. {plan.llama[0].shape.label}: without and with the checkpoint engine (while the budget lasts)",
                  flush=True)
            for spec in plan.llama:
                res.llama.append(run_one(spec, logdir, budget))
                write_report(res, out)
        else:
            res.llama_note = "not run (--no-llama)"
        write_report(res, out)
    except (Terminated, KeyboardInterrupt) as why:
        kill_running()
        res.machine.append(f"WARNING: the bench was stopped ({type(why).__name__} {why}) before it finished; "
                           "what follows is what it had")
        write_report(res, out)
        print(f"bench_trainer_gpu.py: stopped ({why}); partial report in {out}", file=sys.stderr, flush=True)
        return 1
    finally:
        kill_running()
        for spec in all_runs(plan):
            free_run_space(spec)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(res)
    print(text)
    passed = (res.equivalence is not None and equivalence_section(*res.equivalence, plan.smoke)[1]
              and res.resume is not None and resume_section(res.equivalence[0], res.resume, plan.resume_from, plan.smoke)[1])
    # An optional run not made (budget spent, no room in /dev/shm) is reported, and fails nothing.
    not_run = [r for r in all_results(res) if r.spec.optional and r.skipped]
    ok = passed and all(r.ok for r in all_results(res) if r not in not_run)
    print(f"bench_trainer_gpu.py: equivalence {'PASS' if passed else 'FAIL'}; "
          f"{sum(r.ok for r in all_results(res))} of {len(all_results(res))} runs completed"
          + (f" ({', '.join(r.spec.key for r in not_run)} not run: optional)" if not_run else "")
          + (f"; report in {out}" if out else ""), flush=True)
    return 0 if ok else 1
