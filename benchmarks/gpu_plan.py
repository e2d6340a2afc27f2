"""The GPU bench's plan: every trainer run it makes (CPU/GPU equivalence, the resume across
devices, 350M with and without the engine, 1.3B), its command, timeout and expected time, and
the pre-flight check of every command through the trainer's own parser."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass

from benchmarks.gpu_shapes import Shape, estimated_memory_gb, state_bytes_estimate
from benchmarks.processes import PRETRAIN, REPO

STARTUP_S = 30.0
"""Rough start-up of a run on an H200 (imports, NCCL, model build), used to decide what still
fits in --budget-s; it dominates the small runs."""


class BenchError(RuntimeError):
    """The bench itself is misconfigured (not a failed trainer run, which is reported)."""


@dataclass
class RunSpec:
    key: str
    title: str
    shape: Shape
    args: list[str]
    env: dict[str, str]
    timeout_s: float
    estimate_s: float
    """What the run should take on an H200, start-up included (for the budget)."""
    global_batch: int
    micro_batch: int
    bf16: bool
    metrics_path: str | None = None
    """The run's --metrics-file (its numbers: iteration times, losses, the device)."""
    pool_save_dir: str | None = None
    """The run's --save: its shared-memory pool is removed afterwards."""
    pool_bytes: int = 0
    """The engine's host pool (/dev/shm) the run needs; it is not started where less is free."""
    optional: bool = False
    """Not run for want of budget (or of /dev/shm), it is reported as such and fails nothing."""
    script: str = PRETRAIN

    def command(self) -> list[str]:
        return [sys.executable, self.script, *self.args]

    def display(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        args = shlex.join(["python", os.path.relpath(self.script, REPO), *self.args])
        return f"{env} {args}" if env else args


@dataclass
class Plan:
    smoke: bool
    workdir: str
    warmup: int
    """Iterations dropped before the median (``first`` = warmup + 1)."""
    equivalence: tuple[RunSpec, RunSpec]
    resume: RunSpec
    """The CPU leg's checkpoint of iteration ``resume_from``, resumed on the GPU."""
    resume_from: int
    medium: tuple[RunSpec, RunSpec]
    large: RunSpec | None
    llama: tuple[RunSpec, RunSpec] | None = None
    """(e) llama3-1B without and with the engine: the last runs, made only if the budget allows."""


def _train_flags(shape: Shape, micro: int, global_batch: int, iters: int, lr: str) -> list[str]:
    return [*shape.flags, "--mock-data", "--micro-batch-size", str(micro), "--global-batch-size", str(global_batch),
            "--train-iters", str(iters), "--lr", lr, "--log-interval", "1"]


def _checkpoint_pair(key: str, shape: Shape, base: list[str], plain_dir: str, ckpt_dir: str, l1_every: int,
                     host_versions: int, global_batch: int, micro: int, estimates: tuple[float, float],
                     timeouts: tuple[float, float], optional: bool = False) -> tuple[RunSpec, RunSpec]:
    """(without checkpointing, with the engine: L0 every iteration, L1 every ``l1_every``)."""
    # Both runs trace (host-side spans only, no device sync): the engine's counters are written
    # with the trace, and the two runs then differ only by checkpointing.
    plain = RunSpec(f"{key}-plain", f"{shape.label}, bf16, no checkpointing", shape,
                    base + ["--trace-dir", os.path.join(plain_dir, "trace"),
                            "--tensorboard-dir", os.path.join(plain_dir, "tb")], {}, timeouts[0], estimates[0],
                    global_batch, micro, True, optional=optional)
    engine_args = base + [
        "--async-save", "--save-interval", "1", "--save", os.path.join(ckpt_dir, "l2"),
        "--ckpt-local-dir", os.path.join(ckpt_dir, "l1"), "--ckpt-local-interval", str(l1_every),
        "--ckpt-persistent-interval", "1000", "--ckpt-host-versions", str(host_versions),
        "--trace-dir", os.path.join(ckpt_dir, "trace"),
        # TensorBoard turns on the engine's per-iteration telemetry (a gather on a gloo group).
        "--tensorboard-dir", os.path.join(ckpt_dir, "tb")]
    engine = RunSpec(f"{key}-engine", f"{shape.label}, bf16, L0 every iteration + L1 every {l1_every} iterations",
                     shape, engine_args, {}, timeouts[1], estimates[1], global_batch, micro, True,
                     pool_save_dir=os.path.join(ckpt_dir, "l2"),
                     pool_bytes=host_versions * state_bytes_estimate(shape.config, True), optional=optional)
    return plain, engine


def make_plan(workdir: str, smoke: bool, with_large: bool, with_llama: bool = True) -> Plan:
    tiny = Shape.preset("tiny", 1024)
    # (a) fp32, no dropout: the CPU and the GPU must then compute the same function.
    eq_iters = 6 if smoke else 10
    eq_args = _train_flags(tiny, 2, 8, eq_iters, "3e-3") + ["--hidden-dropout", "0", "--attention-dropout", "0"]
    # The CPU leg also saves (synchronously; saving does not change a loss): the resume leg
    # loads its checkpoint on the GPU, across devices.
    resume_from = eq_iters // 2
    cpu_ckpt = os.path.join(workdir, "cpu-ckpt")
    cpu = RunSpec("a-cpu", "tiny, fp32, CPU (GPT_FORCE_CPU=1), saving", tiny,
                  eq_args + ["--save", cpu_ckpt, "--save-interval", str(resume_from)], {"GPT_FORCE_CPU": "1"}, 150,
                  STARTUP_S + 10, 8, 2, False)
    gpu_env = {"GPT_FORCE_CPU": "1"} if smoke else {}
    gpu = RunSpec("a-gpu", "tiny, fp32, GPU" + (" (smoke: also CPU)" if smoke else ""), tiny, eq_args, gpu_env, 150,
                  STARTUP_S + 5, 8, 2, False)
    resume = RunSpec("a-resume", f"tiny, fp32, GPU, resumed from the CPU leg's checkpoint of iteration {resume_from}"
                     + (" (smoke: also CPU)" if smoke else ""), tiny,
                     eq_args + ["--load", cpu_ckpt, "--ckpt-step", str(resume_from)], gpu_env, 150, STARTUP_S + 5,
                     8, 2, False)

    # (b) GPT-3 Medium's shape. Micro-batch 4 x 2048 tokens keeps the GPU's matrix units busy
    # and, without activation recomputation and with materialised attention scores, needs
    # about 50 GB (estimated_memory_gb) of the H200's 141.
    if smoke:
        medium = dataclasses.replace(tiny, label="tiny preset (smoke stand-in for 350M)")
        micro, global_batch, iters, l1_every = 2, 8, 6, 3
    else:
        medium = Shape.explicit("350M (GPT-3 Medium shape)", 24, 1024, 16, 2048, 50257)
        micro, global_batch, iters, l1_every = 4, 16, 30, 10
    base = _train_flags(medium, micro, global_batch, iters, "1e-4") + ["--bf16", "--use-distributed-optimizer"]
    plain, engine = _checkpoint_pair("b", medium, base, os.path.join(workdir, "plain"), os.path.join(workdir, "engine"),
                                     l1_every, 3, global_batch, micro, (STARTUP_S + 20, STARTUP_S + 50), (150, 200))

    large = None
    if with_large:
        if smoke:
            big, micro, global_batch, iters = dataclasses.replace(tiny, label="tiny preset (smoke stand-in for 1.3B)"), 2, 8, 6
        else:
            # Micro-batch 2: about 50 GB by the same estimate (1.3B's states alone are ~24 GB).
            big, micro, global_batch, iters = Shape.preset("1.3B", 50257), 2, 16, 10
        large = RunSpec("d-large", f"{big.label}, bf16, no checkpointing", big,
                        _train_flags(big, micro, global_batch, iters, "1e-4") + ["--bf16", "--use-distributed-optimizer"],
                        {}, 150, STARTUP_S + 25, global_batch, micro, True)
    llama = None
    if with_llama:
        if smoke:
            shape = dataclasses.replace(Shape.preset("llama-tiny", 1024),
                                        label="llama-tiny preset (smoke stand-in for llama3-1B)")
            micro, global_batch, iters, l1_every = 2, 8, 6, 3
        else:
            # Sequence 4096, micro-batch 2: 8 x 4096 tokens per iteration, as many as (b) and (d).
            # ~80 GB by estimated_memory_gb, which counts materialised attention scores (34 GB of
            # it); the default sdpa backend keeps none, so ~46 GB: no recomputation needed.
            shape, micro, global_batch, iters, l1_every = Shape.preset("llama3-1B", 128256, 4096), 2, 8, 10, 5
        base = _train_flags(shape, micro, global_batch, iters, "1e-4") + ["--bf16", "--use-distributed-optimizer"]
        # Two host versions (the 350M pair holds 3): a llama3-1B snapshot is ~17 GB, so the pool
        # is ~35 GB of /dev/shm. Each engine run also ends with the final state flushed to L1 and
        # L2 (~35 GB to disk, ~25 s at the 1.4 GB/s measured): in its estimate.
        llama = _checkpoint_pair("e-llama", shape, base, os.path.join(workdir, "llama-plain"),
                                 os.path.join(workdir, "llama-engine"), l1_every, 2, global_batch, micro,
                                 (STARTUP_S + 20, STARTUP_S + 60), (120, 150), optional=True)
    plan = Plan(smoke, workdir, 2 if smoke else 5, (cpu, gpu), resume, resume_from, (plain, engine), large, llama)
    for spec in all_runs(plan):  # every run's numbers come back in its metrics file
        spec.metrics_path = os.path.join(workdir, "metrics", f"{spec.key}.jsonl")
        spec.args += ["--metrics-file", spec.metrics_path]
    return plan


def all_runs(plan: Plan) -> list[RunSpec]:
    return [*plan.equivalence, plan.resume, *plan.medium, *([plan.large] if plan.large else []), *(plan.llama or ())]


def check_commands(plan: Plan) -> list[str]:
    """Every command through the trainer's own parser and checks (a typo fails here, on the
    CPU, not on a lent GPU); the parsed model must be the shape the report's arithmetic uses."""
    from trainer.arguments import ArgumentError, parse_job_config

    lines = []
    for spec in all_runs(plan):
        saved = {k: os.environ.get(k) for k in spec.env}
        os.environ.update(spec.env)
        try:
            job = parse_job_config(list(spec.args), world_size=1)
        except SystemExit as exit_:  # argparse: an unknown or malformed flag (it printed which)
            raise BenchError(f"{spec.key}: the trainer's parser refused the command (exit {exit_.code}): "
                             f"{spec.display()}") from None
        except ArgumentError as error:
            raise BenchError(f"{spec.key}: {error}\n  command: {spec.display()}") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if job.model.num_parameters(1) != spec.shape.parameters or job.model.seq_length != spec.shape.config.seq_length:
            raise BenchError(f"{spec.key}: the trainer builds {job.model.num_parameters(1)} parameters at sequence "
                             f"{job.model.seq_length}, the report assumes {spec.shape.parameters} at "
                             f"{spec.shape.config.seq_length}; fix Shape for {spec.shape.label}")
        if job.data.global_batch_size != spec.global_batch:
            raise BenchError(f"{spec.key}: global batch {job.data.global_batch_size} != {spec.global_batch}")
        recompute = job.training.recompute.recompute_granularity
        memory = estimated_memory_gb(spec.shape.config, spec.micro_batch, spec.bf16, recompute)
        if memory > 120:
            raise BenchError(f"{spec.key}: estimated {memory:.0f} GB of GPU memory ({recompute or 'no'} recomputation); "
                             "the H200 has 141 GB: lower the micro-batch or recompute")
        lines.append(f"ok {spec.key}: {job.model.num_parameters(1) / 1e6:.1f}M parameters, global batch "
                     f"{job.data.global_batch_size} x {job.model.seq_length} tokens, ~{memory:.1f} GB GPU memory "
                     f"estimated{'' if recompute is None else f' ({recompute} recomputation)'}"
                     + (f", host pool ~{spec.pool_bytes / 1e9:.0f} GB" if spec.pool_bytes else "")
                     + f", timeout {spec.timeout_s:.0f} s" + (", optional (last; not run when the budget is spent)"
                                                               if spec.optional else "")
                     + f"\n    {spec.display()}")
    return lines
