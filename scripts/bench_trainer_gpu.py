#!/usr/bin/env python
"""The real trainer (``scripts/pretrain_gpt.py``) on one GPU: does it compute what the CPU
computes, how fast, and what does the checkpoint engine cost it. Writes a markdown report.

a. CPU vs GPU: the tiny preset in fp32 without dropout, once with ``GPT_FORCE_CPU=1`` and once
   on the GPU; the lm loss of every iteration must agree within 1e-4.
b. A 350M GPT (GPT-3 Medium shape) in bf16 with the distributed optimizer: (i) without
   checkpointing, (ii) with the engine (L0 every iteration, L1 every 10th): median iteration
   time, tokens/s, model FLOPs utilisation, the overhead of (ii) and the engine's own counters.
c. Device-to-host bandwidth into pageable, torch-pinned and CUDA-registered shared memory (the
   engine's host pool), and the bf16 matmul peak the MFU is measured against.
d. (optional) a 1.3B GPT in bf16: tokens/s and MFU.

Each trainer run is one plain ``python scripts/pretrain_gpt.py`` process (a 1-process job) with
its own timeout; a failed run is reported with the tail of its log and the others go on. The
report is rewritten after every step, so a run killed from outside still leaves what it had.

    python3 scripts/bench_trainer_gpu.py --out results/gpu/bench_trainer_gpu.md   # on the GPU machine
    python scripts/bench_trainer_gpu.py --dry-run     # anywhere: every command through the trainer's parser
    python scripts/bench_trainer_gpu.py --smoke --out /tmp/smoke.md   # on CPU: the whole pipeline, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models.config import PRESETS, GPTModelConfig  # noqa: E402  (pure dataclasses: no torch, no megatron-core)

PRETRAIN = os.path.join(REPO, "scripts", "pretrain_gpt.py")
LOSS_TOLERANCE = 1e-4
# The device the trainer reports (``device cuda:0`` in its "> training GPT" line) must be a GPU
# for the GPU leg to prove anything: a trainer that silently fell back to the CPU would match
# the CPU leg trivially.
GPU_DEVICE_TYPE = "cuda"
CPU_DEVICE_TYPE = "cpu"
MATMUL_N = 8192
D2H_BYTES = 2 * 10**9
# Rough per-run costs on an H200 used to decide what still fits in --budget-s; the start-up
# (imports, NCCL, model build) dominates the small runs.
STARTUP_S = 30.0


class BenchError(RuntimeError):
    """The bench itself is misconfigured (not a failed trainer run, which is reported)."""


class Terminated(Exception):
    """SIGTERM (``timeout`` in gpu_check.sh): stop the trainer runs, keep the report."""


RUNNING: set["Running"] = set()
"""Trainer processes alive now: each runs in a session of its own, so a signal to this process
does not reach them, and they must be killed here."""


def _on_sigterm(signum, _frame):
    raise Terminated(signal.Signals(signum).name)


def kill_running() -> None:
    for running in list(RUNNING):
        running.kill()


# ---------------------------------------------------------------------------------------------
# Model shapes and the FLOPs arithmetic
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A model shape and the flags that ask the trainer for it."""

    label: str
    flags: tuple[str, ...]
    config: GPTModelConfig

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> "Shape":
        values = dict(PRESETS[name], vocab_size=vocab_size)
        return cls(f"{name} preset", ("--model-size", name, "--vocab-size", str(vocab_size)), GPTModelConfig(**values))

    @classmethod
    def explicit(cls, label: str, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> "Shape":
        # Explicit flags: the presets have no 350M, and flags say exactly what was run.
        flags = ("--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
                 "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--vocab-size", str(vocab))
        config = GPTModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                ffn_hidden_size=4 * hidden, seq_length=seq, max_position_embeddings=seq,
                                vocab_size=vocab)
        return cls(label, flags, config)

    @property
    def parameters(self) -> int:
        return self.config.num_parameters(1)

    @property
    def padded_vocab(self) -> int:
        return self.config.padded_vocab_size(1)


def model_flops_per_iteration(config: GPTModelConfig, tokens: int) -> float:
    """Model FLOPs of one training iteration (forward + backward, no recomputation counted):
    ``6 * tokens * (non-embedding parameters + output-layer parameters)`` for the matrix
    products, plus ``12 * layers * hidden * seq * tokens`` for attention's scores and weighted
    sum (PaLM, Chowdhery et al. 2022, appendix B; the causal mask is not discounted). The output
    layer is counted although its weight is tied to the word embeddings: its product is done."""
    h, vocab = config.hidden_size, config.padded_vocab_size(1)
    embeddings = vocab * h + config.max_position_embeddings * h
    non_embedding = config.num_parameters(1) - embeddings
    dense = 6.0 * tokens * (non_embedding + vocab * h)
    attention = 12.0 * config.num_layers * h * config.seq_length * tokens
    return dense + attention


MFU_FORMULA = ("model FLOPs per iteration = 6 x tokens x (non-embedding parameters + output-layer parameters) "
               "+ 12 x layers x hidden x seq x tokens (PaLM's formula, appendix B; causal mask not discounted, "
               "no recomputation counted); MFU = those FLOPs / median iteration time / the bf16 matmul peak "
               f"measured below ({MATMUL_N}^3 torch.matmul)")


def estimated_memory_gb(config: GPTModelConfig, micro_batch: int, bf16: bool) -> float:
    """A conservative peak GPU memory estimate without activation recomputation: weights, fp32
    gradients, fp32 main weights and Adam moments (18 B/parameter in bf16), activations per
    layer ``s*b*h*(34 + 5*a*s/h)`` bytes (Korthikanti et al. 2022, table 2: attention scores
    materialised, as the local layer spec without a fused attention does) and the logits with
    their fp32 loss copies."""
    s, b, h, a = config.seq_length, micro_batch, config.hidden_size, config.num_attention_heads
    per_param = 18 if bf16 else 16
    states = config.num_parameters(1) * per_param
    activations = config.num_layers * s * b * h * (34 + 5 * a * s / h) * (1 if bf16 else 2)
    logits = s * b * config.padded_vocab_size(1) * 10
    return (states + activations + logits) / 1e9


# ---------------------------------------------------------------------------------------------
# Parsing the trainer's console output
# ---------------------------------------------------------------------------------------------
# trainer/metrics_log.py: " iteration        3/      10 (...) | consumed samples: ... |
# elapsed time per iteration (ms): 68.5 | tokens/s: ... | learning rate: ... | lm loss: 6.9E+00 | ..."
ITERATION_LINE = re.compile(r"\biteration\s+(\d+)/\s*\d+\b.*?elapsed time per iteration \(ms\):\s*([0-9.eE+-]+)"
                            r".*?\blm loss:\s*(\S+)")
DESCRIBE_LINE = re.compile(r"^> training GPT:.*$", re.M)
DEVICE_IN_DESCRIBE = re.compile(r"\bdevice (\S+)")


@dataclass
class ParsedLog:
    iteration_ms: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    describe: str | None = None
    device: str | None = None
    checkpoint_notes: list[str] = field(default_factory=list)
    """The trainer's "> checkpoint: ..." lines (what a load could not restore, among others)."""
    summary: list[str] = field(default_factory=list)
    """The trainer's end-of-run lines: the checkpointing summary and what follows it."""


def parse_log(text: str) -> ParsedLog:
    parsed = ParsedLog()
    for match in ITERATION_LINE.finditer(text):
        it = int(match.group(1))
        parsed.iteration_ms[it] = float(match.group(2))
        try:
            parsed.loss[it] = float(match.group(3).rstrip("|"))  # "NAN" and "INF" parse too
        except ValueError:
            parsed.loss[it] = float("nan")
    describe = DESCRIBE_LINE.search(text)
    if describe:
        parsed.describe = describe.group(0).strip()
        device = DEVICE_IN_DESCRIBE.search(parsed.describe)
        parsed.device = device.group(1).rstrip(",;") if device else None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("> checkpoint:"):
            parsed.checkpoint_notes.append(line[2:].strip())
        if line.startswith("> checkpointing summary"):
            parsed.summary = [line]
            # Its per-level lines are indented; the next "> ..." line ends it.
            for follow in lines[i + 1:]:
                if not follow.startswith("  "):
                    break
                parsed.summary.append(follow)
        elif line.startswith("> training done") or line.startswith("> trace of every rank"):
            parsed.summary.append(line)
    return parsed


def median_ms(parsed: ParsedLog, first: int) -> float | None:
    """Median iteration time over iterations ``first``.. (the earlier ones warm up)."""
    times = [ms for it, ms in parsed.iteration_ms.items() if it >= first]
    return statistics.median(times) if times else None


@dataclass
class Throughput:
    median_ms: float
    tokens_per_s: float
    model_tflops: float
    mfu: float | None


def throughput(config: GPTModelConfig, global_batch: int, ms: float, peak_tflops: float | None) -> Throughput:
    tokens = global_batch * config.seq_length
    tflops = model_flops_per_iteration(config, tokens) / (ms / 1000) / 1e12
    return Throughput(ms, tokens / (ms / 1000), tflops, tflops / peak_tflops if peak_tflops else None)


@dataclass
class EngineSummary:
    """The engine's counters from ``checkpoint-stats-rank0.json``; None where the trainer's
    version does not write the field yet."""

    stall_ms: float
    fence_waits: int
    snapshots: int
    requests: int | None
    request_ms: float | None
    state_gb: float | None
    state_gb_estimated: bool
    blocked_ms_per_gb_per_request: float | None
    copy_gbps: float | None
    flushes: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    stall_by_iteration_ms: dict[int, float] = field(default_factory=dict)


def engine_summary(stats: dict, estimated_state_bytes: int) -> EngineSummary:
    state_bytes = stats.get("state_bytes")
    estimated = state_bytes is None
    if estimated:
        state_bytes = estimated_state_bytes
    gb = state_bytes / 1e9 if state_bytes else None
    requests = stats.get("requests")
    request_s = stats.get("request_seconds")
    snapshots = int(stats.get("snapshots", 0))
    per_gb = None
    if request_s is not None and requests and gb:
        per_gb = request_s * 1000 / requests / gb
    copy_gbps = None
    copy_s = stats.get("copy_seconds")
    if copy_s and snapshots and gb:
        copy_gbps = gb * snapshots / copy_s
    flushes: dict[str, dict] = {}
    for f in stats.get("flushes", []):
        level = flushes.setdefault(f["level"], {"ok": 0, "failed": 0, "bytes": 0, "seconds": []})
        if f.get("error"):
            level["failed"] += 1
        else:
            level["ok"] += 1
            level["bytes"] += f["bytes"]
            level["seconds"].append(f["seconds"])
    return EngineSummary(
        stall_ms=stats.get("stall_seconds", 0.0) * 1000, fence_waits=int(stats.get("fence_waits", 0)),
        snapshots=snapshots, requests=requests, request_ms=None if request_s is None else request_s * 1000,
        state_gb=gb, state_gb_estimated=estimated, blocked_ms_per_gb_per_request=per_gb, copy_gbps=copy_gbps,
        flushes=flushes, skipped=dict(stats.get("skipped", {})),
        stall_by_iteration_ms={int(k): v * 1000 for k, v in stats.get("stall_by_iteration", {}).items()},
    )


def state_bytes_estimate(config: GPTModelConfig, bf16: bool) -> int:
    """Bytes of one snapshot on one rank: fp32 main weights and two Adam moments, plus the bf16
    weights in bf16 (with fp32 weights the weight record points at the main weights)."""
    return config.num_parameters(1) * (14 if bf16 else 12)


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------
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
    stats_path: str | None = None
    pool_save_dir: str | None = None
    """The run's --save: its shared-memory pool is removed afterwards."""
    script: str = PRETRAIN

    def command(self) -> list[str]:
        return [sys.executable, self.script, *self.args]

    def display(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        args = shlex.join(["python", os.path.relpath(self.script, REPO), *self.args])
        return f"{env} {args}" if env else args


@dataclass
class RunResult:
    spec: RunSpec
    rc: int | None = None
    timed_out: bool = False
    skipped: str | None = None
    wall_s: float = 0.0
    log_path: str | None = None
    tail: str = ""
    parsed: ParsedLog = field(default_factory=ParsedLog)
    stats: dict | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out and self.skipped is None

    def failure(self) -> str | None:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        if self.rc != 0:
            return f"exit code {self.rc}"
        return None


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


def _train_flags(shape: Shape, micro: int, global_batch: int, iters: int, lr: str) -> list[str]:
    return [*shape.flags, "--mock-data", "--micro-batch-size", str(micro), "--global-batch-size", str(global_batch),
            "--train-iters", str(iters), "--lr", lr, "--log-interval", "1"]


def make_plan(workdir: str, smoke: bool, with_large: bool) -> Plan:
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
    plain_dir, ckpt_dir = os.path.join(workdir, "plain"), os.path.join(workdir, "engine")
    # Both runs trace (host-side spans only, no device sync): the engine's counters are written
    # with the trace, and the two runs then differ only by checkpointing.
    plain = RunSpec("b-plain", f"{medium.label}, bf16, no checkpointing", medium,
                    base + ["--trace-dir", os.path.join(plain_dir, "trace"),
                            "--tensorboard-dir", os.path.join(plain_dir, "tb")], {}, 150, STARTUP_S + 20,
                    global_batch, micro, True)
    engine_args = base + [
        "--async-save", "--save-interval", "1", "--save", os.path.join(ckpt_dir, "l2"),
        "--ckpt-local-dir", os.path.join(ckpt_dir, "l1"), "--ckpt-local-interval", str(l1_every),
        "--ckpt-persistent-interval", "1000", "--ckpt-host-versions", "3",
        "--trace-dir", os.path.join(ckpt_dir, "trace"),
        # TensorBoard turns on the engine's per-iteration telemetry (a gather on a gloo group).
        "--tensorboard-dir", os.path.join(ckpt_dir, "tb")]
    engine = RunSpec("b-engine", f"{medium.label}, bf16, L0 every iteration + L1 every {l1_every} iterations", medium,
                     engine_args, {}, 200, STARTUP_S + 50, global_batch, micro, True,
                     stats_path=os.path.join(ckpt_dir, "trace", "checkpoint-stats-rank0.json"),
                     pool_save_dir=os.path.join(ckpt_dir, "l2"))

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
    return Plan(smoke, workdir, 2 if smoke else 5, (cpu, gpu), resume, resume_from, (plain, engine), large)


def all_runs(plan: Plan) -> list[RunSpec]:
    return [*plan.equivalence, plan.resume, *plan.medium, *([plan.large] if plan.large else [])]


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
        memory = estimated_memory_gb(spec.shape.config, spec.micro_batch, spec.bf16)
        if memory > 120:
            raise BenchError(f"{spec.key}: estimated {memory:.0f} GB of GPU memory (no recomputation); the H200 "
                             "has 141 GB: lower the micro-batch")
        lines.append(f"ok {spec.key}: {job.model.num_parameters(1) / 1e6:.1f}M parameters, global batch "
                     f"{job.data.global_batch_size} x {job.model.seq_length} tokens, ~{memory:.1f} GB GPU memory "
                     f"estimated, timeout {spec.timeout_s:.0f} s\n    {spec.display()}")
    return lines


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
class Running:
    """One trainer process; its output goes to its log and, prefixed, to our stdout."""

    def __init__(self, spec: RunSpec, log_path: str, timeout_s: float):
        self.spec, self.log_path, self.timeout_s = spec, log_path, timeout_s
        env = dict(os.environ)
        # A plain launch must become a 1-process job even if this bench runs under torchrun.
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            env.pop(var, None)
        env.update(spec.env)
        env["PYTHONUNBUFFERED"] = "1"
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.log = open(log_path, "w")
        self.log.write(f"$ {spec.display()}\n")
        self.log.flush()
        self.started = time.monotonic()
        # A session of its own: a timeout kills the trainer and anything it started.
        self.proc = subprocess.Popen(spec.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO, text=True, bufsize=1, start_new_session=True)
        RUNNING.add(self)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()
        print(f"[{spec.key}] started (timeout {timeout_s:.0f} s): {spec.display()}", flush=True)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            print(f"[{self.spec.key}] {line}", end="", flush=True)

    def kill(self) -> None:
        # SIGKILL, not SIGTERM: the trainer answers SIGTERM with a final save and a drain, which
        # is what we are out of time for.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> RunResult:
        result = RunResult(self.spec, log_path=self.log_path)
        remaining = self.timeout_s - (time.monotonic() - self.started)
        try:
            result.rc = self.proc.wait(timeout=max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            result.timed_out = True
            self.kill()
            result.rc = self.proc.wait()
        RUNNING.discard(self)
        self.reader.join(timeout=10)
        result.wall_s = time.monotonic() - self.started
        self.log.close()
        with open(self.log_path) as f:
            text = f.read()
        result.parsed = parse_log(text)
        result.tail = "\n".join(text.splitlines()[-40:])
        if self.spec.stats_path and os.path.exists(self.spec.stats_path):
            with open(self.spec.stats_path) as f:
                result.stats = json.load(f)
        print(f"[{self.spec.key}] {'ok' if result.ok else result.failure()} in {result.wall_s:.0f} s, "
              f"{len(result.parsed.iteration_ms)} iterations logged", flush=True)
        return result


def free_run_space(spec: RunSpec) -> None:
    """The engine run's pool (GBs of /dev/shm) and checkpoints (GBs of disk) go right after it."""
    if spec.pool_save_dir:
        from checkpointing.host_pool import remove_segments

        freed = remove_segments(spec.pool_save_dir)
        if freed:
            print(f"[{spec.key}] removed its shared-memory pool ({freed / 1e9:.1f} GB)", flush=True)
        shutil.rmtree(os.path.dirname(spec.pool_save_dir) + "/l1", ignore_errors=True)
        shutil.rmtree(spec.pool_save_dir, ignore_errors=True)


class Budget:
    """The wall-clock budget of all GPU work: a run gets min(its timeout, what is left), and a
    run whose expected time no longer fits is skipped with a note instead of being cut short."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout_for(self, spec: RunSpec) -> tuple[float, str | None]:
        left = self.left()
        if left < spec.estimate_s:
            return 0.0, f"{left:.0f} s of the budget left, the run needs ~{spec.estimate_s:.0f} s"
        return min(spec.timeout_s, left), None


def run_one(spec: RunSpec, logdir: str, budget: Budget) -> RunResult:
    timeout, why = budget.timeout_for(spec)
    if why:
        print(f"[{spec.key}] skipped: {why}", flush=True)
        return RunResult(spec, skipped=why)
    try:
        return Running(spec, os.path.join(logdir, f"{spec.key}.log"), timeout).finish()
    finally:
        free_run_space(spec)


def run_pair_concurrently(specs: tuple[RunSpec, RunSpec], logdir: str, budget: Budget) -> tuple[RunResult, RunResult]:
    """The two legs of (a) at once: the CPU leg needs no GPU and nothing of it is timed."""
    timeout = min(min(s.timeout_s for s in specs), budget.left())
    need = max(s.estimate_s for s in specs)
    if timeout < need:
        why = f"{budget.left():.0f} s of the budget left, the runs need ~{need:.0f} s"
        return RunResult(specs[0], skipped=why), RunResult(specs[1], skipped=why)
    running = [Running(s, os.path.join(logdir, f"{s.key}.log"), timeout) for s in specs]
    first, second = (r.finish() for r in running)
    return first, second


def measure_hardware(json_path: str) -> int:
    """(c) in a process of its own (a CUDA error here must not take the report with it): the bf16
    matmul peak and device-to-host copy rates into three kinds of host memory."""
    import torch

    if not torch.cuda.is_available():
        print("bench_trainer_gpu.py --part hardware needs a CUDA GPU", file=sys.stderr)
        return 2
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # cuBLAS picks its kernel and the clocks ramp up on the first calls
        torch.matmul(a, b)
    trials = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.matmul(a, b)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / 10
        trials.append(2 * MATMUL_N**3 / seconds / 1e12)
    out["matmul_tflops_trials"] = trials
    out["matmul_tflops"] = max(trials)  # the peak: the best of three runs of 10 products
    del a, b
    print(f"bf16 {MATMUL_N}^3 matmul: {', '.join(f'{t:.0f}' for t in trials)} TFLOP/s", flush=True)

    n = D2H_BYTES
    device = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(7)

    def rate(host: torch.Tensor) -> float:
        host.copy_(device, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):
            host.copy_(device, non_blocking=True)
        torch.cuda.synchronize()
        return 3 * n / (time.perf_counter() - started) / 1e9

    rates: dict[str, float] = {}
    pageable = torch.empty(n, dtype=torch.uint8).fill_(0)  # touched: first touch is not a copy cost
    rates["pageable (torch.empty)"] = rate(pageable)
    del pageable
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    rates["pinned (torch.empty(pin_memory=True))"] = rate(pinned)
    del pinned
    # The engine's pool: a /dev/shm file mapped shared, touched, then page-locked with
    # cudaHostRegister (checkpointing/host_pool.py HostSlot, shard_copy.py CudaShardCopier.register).
    path = f"/dev/shm/bench-trainer-gpu-d2h-{os.getpid()}"
    try:
        shm = torch.from_file(path, shared=True, size=n, dtype=torch.uint8)
        shm.fill_(0)
        error = int(torch.cuda.cudart().cudaHostRegister(shm.data_ptr(), n, 0))
        if error != 0:
            out["shm_error"] = f"cudaHostRegister failed with error {error}"
        else:
            try:
                rates["/dev/shm, cudaHostRegister (the engine's pool)"] = rate(shm)
            finally:
                torch.cuda.cudart().cudaHostUnregister(shm.data_ptr())
        del shm
    except (RuntimeError, OSError) as error:
        out["shm_error"] = str(error)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    out["d2h_gbps"] = rates
    for name, gbps in rates.items():
        print(f"device-to-host {n / 1e9:.0f} GB into {name}: {gbps:.1f} GB/s", flush=True)
    with open(json_path, "w") as f:
        json.dump(out, f)
    return 0


def run_hardware(logdir: str, budget: Budget) -> tuple[dict | None, str | None]:
    need = STARTUP_S / 2 + 10
    if budget.left() < need:
        return None, f"skipped: {budget.left():.0f} s of the budget left"
    json_path = os.path.join(logdir, "hardware.json")
    spec = RunSpec("c-hardware", "matmul peak and device-to-host copies", Shape.preset("tiny", 1024),
                   ["--part", "hardware", "--json", json_path], {}, min(90, budget.left()), need, 1, 1, False,
                   script=os.path.abspath(__file__))
    result = Running(spec, os.path.join(logdir, "c-hardware.log"), spec.timeout_s).finish()
    if result.ok and os.path.exists(json_path):
        with open(json_path) as f:
            return json.load(f), None
    return None, f"{result.failure() or 'no result'}\n\n```\n{result.tail}\n```"


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
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


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _failure_block(result: RunResult) -> list[str]:
    lines = [f"**{result.spec.key} did not complete: {result.failure()}.**", ""]
    if result.tail:
        lines += ["Tail of its log:", "", "```", result.tail, "```", ""]
    return lines


def equivalence_section(cpu: RunResult, gpu: RunResult, smoke: bool) -> tuple[list[str], bool]:
    lines = ["## a. CPU vs GPU: the same losses", ""]
    for r in (cpu, gpu):
        if not r.ok:
            lines += _failure_block(r)
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
            lines.append(f"| {it} | {_fmt(a, '.6f')} | {_fmt(b, '.6f')} | missing |")
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
        reasons.append("iterations missing from a log")
    lines += ["", f"Max abs difference {worst:.2e} (tolerance {LOSS_TOLERANCE:g}; the console prints 7 significant "
                  f"digits). Result: **{'PASS' if passed else 'FAIL'}**" + (f" ({'; '.join(reasons)})" if reasons else ""),
              "", f"Median iteration time: CPU {_fmt(median_ms(cpu.parsed, 2), '.1f', ' ms')}, "
                  f"GPU {_fmt(median_ms(gpu.parsed, 2), '.1f', ' ms')} (iterations 2.., tiny model: start-up bound).", ""]
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
                lines += _failure_block(r)
        return lines + ["Result: **FAIL** (a run did not complete)", ""], False
    note = [line for line in resume.parsed.checkpoint_notes if "not restored" in line]
    said = any(RNG_NOT_RESTORED in line for line in note)
    its = sorted(resume.parsed.loss)
    complete = bool(its) and its[0] == resume_from + 1 and all(it in cpu.parsed.loss for it in its)
    worst = max((abs(resume.parsed.loss[it] - cpu.parsed.loss[it]) for it in its if it in cpu.parsed.loss), default=0.0)
    if worst != worst:
        worst = float("inf")
    lines += ["| iteration | CPU, uninterrupted | GPU, resumed | abs difference |", "|---|---|---|---|"]
    lines += [f"| {it} | {_fmt(cpu.parsed.loss.get(it), '.6f')} | {resume.parsed.loss[it]:.6f} | "
              f"{_fmt(abs(resume.parsed.loss[it] - cpu.parsed.loss[it]) if it in cpu.parsed.loss else None, '.2e')} |"
              for it in its]
    passed = complete and worst <= LOSS_TOLERANCE and (said or smoke)
    lines += ["", f"The trainer said: `{note[0] if note else 'nothing about RNG states'}`"
              + (" (smoke: the same device, so nothing to say)" if smoke else ""), "",
              f"Max abs difference {worst:.2e} (tolerance {LOSS_TOLERANCE:g}). Result: **{'PASS' if passed else 'FAIL'}**", ""]
    return lines, passed


def throughput_row(label: str, result: RunResult, first: int, peak: float | None, base_ms: float | None) -> tuple[str, float | None]:
    ms = median_ms(result.parsed, first)
    # A run cut short by its timeout still measured the iterations it logged.
    if not result.ok and not (result.timed_out and ms is not None):
        return f"| {label} | {result.failure()} | | | | | |", None
    if ms is None:
        return f"| {label} | no iteration {first}.. logged | | | | | |", None
    if not result.ok:
        label += f" ({result.failure()}; {sum(1 for it in result.parsed.iteration_ms if it >= first)} iterations measured)"
    t = throughput(result.spec.shape.config, result.spec.global_batch, ms, peak)
    overhead = f"{100 * (ms / base_ms - 1):+.1f}%" if base_ms else "-"
    return (f"| {label} | {_params(result.spec.shape.parameters)} | {ms:.1f} ms | {t.tokens_per_s:,.0f} | "
            f"{t.model_tflops:.1f} | {_fmt(None if t.mfu is None else 100 * t.mfu, '.1f', '%')} | {overhead} |"), ms


THROUGHPUT_HEADER = ["| run | parameters | median iteration | tokens/s | model TFLOP/s | MFU | iteration time vs (i) |",
                     "|---|---|---|---|---|---|---|"]


def engine_section(result: RunResult, plain: RunResult | None) -> list[str]:
    lines = []
    if result.stats is None:
        return [f"No engine counters: `{result.spec.stats_path}` was not written"
                + (" (the run did not complete)." if not result.ok else "."), ""]
    e = engine_summary(result.stats, state_bytes_estimate(result.spec.shape.config, result.spec.bf16))
    gb = _fmt(e.state_gb, ".2f", " GB") + (" (estimated from the parameter count: the stats have no state_bytes)"
                                           if e.state_gb_estimated else "")
    train_s = sum(result.parsed.iteration_ms.values()) / 1000
    lines += [f"Engine counters (`checkpoint-stats-rank0.json`), snapshot size {gb}:", "",
              f"- stall (fence waits and waits for a free slot; on a GPU timed on the device): {e.stall_ms:.1f} ms in all"
              + (f", {100 * e.stall_ms / 1000 / train_s:.2f}% of {train_s:.1f} s of training" if train_s else "")
              + f"; {e.fence_waits} fences reached an unfinished copy; {e.snapshots} snapshots (L0)",
              "- `request` blocked: " + (f"{e.request_ms:.1f} ms in all over {e.requests} requests, "
                                          f"{_fmt(e.blocked_ms_per_gb_per_request, '.3f')} ms per GB per request"
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
                     f"{_fmt(statistics.mean(secs) if secs else None, '.2f', ' s')} each, {_fmt(rate, '.2f', ' GB/s')}), "
                     f"{f['failed']} failed, {e.skipped.get(level, 0)} superseded")
    lines.append("")
    if result.parsed.summary:
        lines += ["End-of-run lines the trainer printed:", "", "```", *result.parsed.summary, "```", ""]
    if result.parsed.iteration_ms:
        base = plain.parsed.iteration_ms if plain is not None else {}
        lines += ["| iteration | (i) ms | (ii) ms | (ii) stall ms |", "|---|---|---|---|"]
        for it in sorted(result.parsed.iteration_ms):
            lines.append(f"| {it} | {_fmt(base.get(it), '.1f')} | {result.parsed.iteration_ms[it]:.1f} | "
                         f"{e.stall_by_iteration_ms.get(it, 0.0):.1f} |")
        lines.append("")
    return lines


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
                lines += _failure_block(r)
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
        lines += [f"The trainer's own snapshots (b ii): {_fmt(e.copy_gbps, '.1f', ' GB/s')} from `request` to landed "
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
                lines += _failure_block(r)
            if r.parsed.summary:
                lines += ["```", *r.parsed.summary, "```", ""]
        else:
            lines += [res.large_note or "not run", ""]

    describes = [(r.spec.key, r.parsed.describe) for r in _all_results(res) if r.parsed.describe]
    if describes:
        lines += ["## What the trainer said it built", "", "```"]
        lines += [f"{key}: {text}" for key, text in describes]
        lines += ["```", ""]
    return "\n".join(lines)


def _all_results(res: Results) -> list[RunResult]:
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
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown report here (rewritten after every step)")
    parser.add_argument("--workdir", help="checkpoints, traces and logs (default: a new directory under /tmp)")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="wall-clock budget of all runs; a run that no longer fits is skipped with a note")
    parser.add_argument("--no-1p3b", dest="large", action="store_false", help="skip (d), the 1.3B run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints are GBs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="parse every command with the trainer's parser, print them, exit (no GPU needed)")
    mode.add_argument("--smoke", action="store_true",
                      help="run everything on the CPU with the tiny model (tests this script; numbers mean nothing)")
    parser.add_argument("--part", choices=("hardware",), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "hardware":
        if not args.json:
            parser.error("--part hardware needs --json PATH")
        return measure_hardware(args.json)

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    workdir = args.workdir or (os.path.join(tempfile.gettempdir(), "bench-trainer-gpu-dry-run") if args.dry_run
                               else tempfile.mkdtemp(prefix="bench-trainer-gpu-"))
    plan = make_plan(workdir, args.smoke, args.large)
    check_note = None
    try:
        checked = check_commands(plan)
    except (BenchError, ImportError) as error:
        if args.dry_run or args.smoke:
            print(f"bench_trainer_gpu.py: {error}", file=sys.stderr)
            return 2
        # On the lent GPU machine every run is worth trying (its time is scarce, and the CPU
        # dry run passed): a run that cannot start is reported with its log.
        check_note = f"the pre-flight check of the commands failed: {error}"
        print(f"bench_trainer_gpu.py: WARNING: {check_note}; running anyway", flush=True)
    if args.dry_run:
        print(f"bench_trainer_gpu.py --dry-run: {len(checked)} trainer commands parse with the trainer's own parser")
        for line in checked:
            print(line)
        print(f"plus: python scripts/bench_trainer_gpu.py --part hardware (bf16 {MATMUL_N}^3 matmul peak, "
              f"{D2H_BYTES / 1e9:.0f} GB device-to-host copies)")
        expected = (sum(s.estimate_s for s in plan.equivalence[1:]) + plan.resume.estimate_s + sum(s.estimate_s for s in plan.medium)
                    + (plan.large.estimate_s if plan.large else 0) + STARTUP_S / 2 + 10)
        print(f"expected GPU time ~{expected:.0f} s on an H200, budget {args.budget_s:.0f} s")
        return 0

    if args.smoke:
        # Small and polite on a shared CPU machine: one thread per process.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    budget = Budget(args.budget_s)
    res = Results(plan, machine_lines(args.smoke) + ([f"WARNING: {check_note}"] if check_note else []), started=started)
    print(f"bench_trainer_gpu.py: work directory {workdir}, budget {args.budget_s:.0f} s", flush=True)
    write_report(res, args.out)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        print("== a. CPU vs GPU losses (both legs at once)", flush=True)
        res.equivalence = run_pair_concurrently(plan.equivalence, logdir, budget)
        write_report(res, args.out)
        print("== a2. the CPU leg's checkpoint resumed on the GPU", flush=True)
        res.resume = run_one(plan.resume, logdir, budget)
        write_report(res, args.out)
        if args.smoke:
            res.hardware_note = "skipped (--smoke: no GPU): the matmul peak and the device-to-host copies need CUDA"
        else:
            print("== c. bf16 matmul peak and device-to-host bandwidth", flush=True)
            res.hardware, res.hardware_note = run_hardware(logdir, budget)
        write_report(res, args.out)
        print(f"== b. {plan.medium[0].shape.label}: without and with the checkpoint engine", flush=True)
        for spec in plan.medium:
            res.medium.append(run_one(spec, logdir, budget))
            write_report(res, args.out)
        if plan.large is not None:
            print(f"== d. {plan.large.shape.label}", flush=True)
            res.large = run_one(plan.large, logdir, budget)
        else:
            res.large_note = "not run (--no-1p3b)"
        write_report(res, args.out)
    except (Terminated, KeyboardInterrupt) as why:
        kill_running()
        res.machine.append(f"WARNING: the bench was stopped ({type(why).__name__} {why}) before it finished; "
                           "what follows is what it had")
        write_report(res, args.out)
        print(f"bench_trainer_gpu.py: stopped ({why}); partial report in {args.out}", file=sys.stderr, flush=True)
        return 1
    finally:
        kill_running()
        for spec in all_runs(plan):
            free_run_space(spec)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = render(res)
    print(text)
    passed = (res.equivalence is not None and equivalence_section(*res.equivalence, plan.smoke)[1]
              and res.resume is not None and resume_section(res.equivalence[0], res.resume, plan.resume_from, plan.smoke)[1])
    ok = passed and all(r.ok for r in _all_results(res))
    print(f"bench_trainer_gpu.py: equivalence {'PASS' if passed else 'FAIL'}; "
          f"{sum(r.ok for r in _all_results(res))} of {len(_all_results(res))} runs completed"
          + (f"; report in {args.out}" if args.out else ""), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
