"""The training loop: build the stage, run 1F1B, reduce gradients, step, log."""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from checkpointing.base import Tracer, faults
from checkpointing.engine import start_template
from checkpointing.manager import claim_checkpoint_dirs
from models.cpu_compat import apply_cpu_compat
from models.fusions import resolve_fusions
from models.gpt import build_gpt_model
from models.megatron_import import import_megatron_core
from models.param_layout import global_param_specs
from trainer import startup
from trainer.checkpointer import Checkpointer
from trainer.config import JobConfig
from trainer.data import BatchSource, build_dataset, prefixes_without_record
from trainer.device import DeviceContext, select_device
from trainer.flat_buffers import FlatParamsAndGrads
from trainer.live_rollback import LiveRollbacks
from trainer.lr_schedule import learning_rate
from trainer.metrics_file import MetricsFile, peak_resident_mib
from trainer.metrics_log import MetricsLogger
from trainer.optimizer import DistributedAdam
from trainer.parallel_dims import ParallelGroups
from trainer.pipeline_schedule import PipelineShape, forward_backward_1f1b, forward_only
from trainer.startup import StartupClock


@dataclass
class TrainResult:
    """What a run did; losses are known on the last pipeline stage (empty elsewhere)."""

    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    iteration_times: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_ctx: DeviceContext, timeout_minutes: float = 10.0) -> None:
    """Join the job started by torchrun; a plain ``python`` launch becomes a 1-process job."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend=device_ctx.backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def set_seeds(seed: int, pp_rank: int) -> None:
    """Megatron-LM's seeding: one seed per pipeline stage, the TP RNG tracker on top."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


class StopSignal:
    """SIGTERM (a scheduler's preemption, torchrun stopping the job) ends training after the
    current iteration, so the final checkpoint is saved and every level drained."""

    def __init__(self):
        self.requested: str | None = None

    @classmethod
    def install(cls) -> "StopSignal":
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, _frame: setattr(stop, "requested", signal.Signals(signum).name))
        return stop


def _no_phase(_name: str):
    return contextlib.nullcontext()


class Trainer:
    """One rank's share of a job: model stage, flat buffers, optimizer, data."""

    def __init__(self, job: JobConfig, device_ctx: DeviceContext, groups: ParallelGroups):
        self.job = job
        self.device_ctx = device_ctx
        self.groups = groups
        dims, tcfg = job.parallel, job.training
        set_seeds(tcfg.seed, groups.pp_rank)
        dtype = torch.bfloat16 if tcfg.bf16 else torch.float32
        self.fusions = resolve_fusions(tcfg.fusions, device_ctx.device)
        self.model = build_gpt_model(
            job.model,
            tensor_parallel=dims.tensor_parallel,
            pipeline_parallel=dims.pipeline_parallel,
            pre_process=groups.is_first_stage,
            post_process=groups.is_last_stage,
            device=device_ctx.device,
            params_dtype=dtype,
            transformer_impl=tcfg.transformer_impl,
            attention_backend=tcfg.attention_backend,
            seed=tcfg.seed,
            fusions=self.fusions,
            sequence_parallel=dims.sequence_parallel,
            recompute=tcfg.recompute,
        )
        # Which parameters are split over TP comes from megatron-core's sharded metadata: its
        # ``tensor_model_parallel`` attribute is not set when its own initialisation is skipped.
        self.param_specs = global_param_specs(self.model)
        tp_split = frozenset(n for n, s in self.param_specs.items() if s.local_shape != s.global_shape)
        self.buffers = FlatParamsAndGrads(self.model, groups.tp_rank, tp_split,
                                          shapes={n: s.local_shape for n, s in self.param_specs.items()})
        self.optimizer = DistributedAdam(
            self.buffers, job.optimizer, groups.dp_group, dims.data_parallel, groups.model_parallel_group
        )
        self.train_data = BatchSource(
            build_dataset(job.data, "train", job.model.vocab_size, tcfg.seed), job.data, groups.dp_rank, dims.data_parallel, device_ctx.device
        )
        self.valid_data = None
        if tcfg.eval_interval and tcfg.eval_iters > 0:
            self.valid_data = BatchSource(
                build_dataset(job.data, "valid", job.model.vocab_size, tcfg.seed), job.data, groups.dp_rank, dims.data_parallel, device_ctx.device
            )
        sequence = job.model.seq_length // (dims.tensor_parallel if dims.sequence_parallel else 1)
        self.shape = PipelineShape(
            seq_length=job.model.seq_length,
            activation_shape=(sequence, job.data.micro_batch_size, job.model.hidden_size),
            dtype=dtype,
            device=device_ctx.device,
        )
        self.iteration = 0
        self.iterations_to_skip: set[int] = set(job.training.rollback.iterations_to_skip)
        """Iterations whose batches are skipped (``--iterations-to-skip``, what a checkpoint recorded,
        what a rollback added)."""
        self.phase = _no_phase
        self.raise_flags = None
        """``(iteration, loss) -> loss``, called inside each step before its reductions to raise the
        step's flags (``trainer.live_rollback``); None: no flag is ever raised."""

    def _mean_loss(self, losses: list[torch.Tensor], num_microbatches: int) -> float:
        """Mean over micro-batches and data-parallel ranks; meaningful on the last stage."""
        if not self.groups.is_last_stage:
            return float("nan")
        total = torch.stack(losses).sum() / num_microbatches
        dist.all_reduce(total, group=self.groups.dp_group)
        return (total / self.job.parallel.data_parallel).item()

    def train_step(self) -> tuple[float, float, float]:
        """One iteration; returns (loss, lr, grad norm)."""
        self.iteration += 1
        self.model.train()
        self.buffers.zero_grads()
        m = self.train_data.num_microbatches
        losses = forward_backward_1f1b(
            self.model, self.train_data.microbatches(self.iteration - 1), m, self.groups, self.shape, self.phase
        )
        # Before the gradient reduction: a loss spike's flag rides on it (``trainer.iteration_signals``).
        loss = self._mean_loss(losses, m)
        if self.raise_flags is not None:
            loss = self.raise_flags(self.iteration, loss)
        with self.phase("grad-reduce"):
            self.buffers.allreduce_tied_embedding_grads(self.groups.embedding_group)
            self.buffers.allreduce_sequence_parallel_grads(self.groups.tp_group)
            self.buffers.reduce_grads(self.groups.dp_group, self.job.parallel.data_parallel, self.optimizer.owned_ranges)
        lr = learning_rate(self.job.lr, self.iteration)
        with self.phase("optimizer"):
            grad_norm = self.optimizer.step(lr)
        return loss, lr, grad_norm

    def evaluate(self) -> float:
        self.model.eval()
        m = self.valid_data.num_microbatches
        losses = []
        for it in range(self.job.training.eval_iters):
            losses += forward_only(self.model, self.valid_data.microbatches(it), m, self.groups, self.shape)
        return self._mean_loss(losses, m * self.job.training.eval_iters) if self.groups.is_last_stage else float("nan")


def describe_job(job: JobConfig, trainer: Trainer) -> str:
    dims = job.parallel
    params = job.model.num_parameters(dims.tensor_parallel)
    return (
        f"> training GPT: {params / 1e6:.2f}M parameters, {dims.describe()}, "
        f"{trainer.train_data.num_microbatches} micro-batches of {job.data.micro_batch_size} per rank, "
        f"global batch {job.data.global_batch_size}, {'bf16' if job.training.bf16 else 'fp32'}, "
        f"attention {job.training.attention_backend}, "
        f"{'distributed' if trainer.optimizer.distributed else 'replicated'} optimizer "
        f"({len(trainer.optimizer.shards)} shards on this rank), device {trainer.device_ctx.device}"
    )


def pretrain(job: JobConfig, device_ctx: DeviceContext | None = None) -> TrainResult:
    """Train as configured; every rank of the job calls it."""
    clock = StartupClock()
    clock.mark(startup.INTERPRETER)
    if job.checkpoint.async_save and job.checkpoint.flusher_start == "template":
        start_template()  # before any thread or process group: the flushers are forked from it
    device_ctx = device_ctx or select_device()
    import_megatron_core()  # its first import: torch.compile deferred (no Inductor at start-up)
    apply_cpu_compat(device_ctx.device)  # before any megatron-core call; does nothing on CUDA
    tcfg = job.training
    init_distributed(device_ctx, tcfg.distributed_timeout_minutes)
    groups = job.parallel.initialize()
    claim_checkpoint_dirs(job.checkpoint, groups.rank)  # before the model and any read: fail in seconds
    clock.mark(startup.PROCESS_GROUPS)
    logger = MetricsLogger(groups.is_logging_rank, tcfg.train_iters, tcfg.tensorboard_dir)
    metrics = MetricsFile(tcfg.metrics_file, groups.is_logging_rank)
    result = TrainResult()
    checkpointer = None
    try:
        trainer = Trainer(job, device_ctx, groups)
        clock.mark(startup.MODEL)
        # The model, its optimizer and megatron-core's modules are built once and live for the
        # run: move them out of the collector's reach, or a full collection pass over them (a
        # pause that grows with the model) lands in a checkpoint restore or the first steps.
        gc.collect()
        gc.freeze()
        logger.info(describe_job(job, trainer))
        for prefix in prefixes_without_record(job.data):
            logger.info(f"WARNING: --data-path {prefix} has no record of the tokenizer it was prepared with (prepared "
                        f"before records were written): it is read as {job.tokenizer_type} says, and a token "
                        "id past the vocabulary stops the run; prepare it again to record its tokenizer")
        for refusal in trainer.fusions.refused:
            logger.info(f"> {refusal}")
        tracer = Tracer(groups.rank) if tcfg.trace_dir else None
        if tracer is not None:
            os.makedirs(tcfg.trace_dir, exist_ok=True)
            trainer.phase = tracer.phase_hook()
        if job.checkpoint.save or job.checkpoint.load:
            checkpointer = Checkpointer(job.checkpoint, trainer, logger, tracer, telemetry=bool(tcfg.tensorboard_dir))
            clock.mark(startup.ENGINE)
            trainer.iteration = checkpointer.load()
            clock.mark(startup.LOAD)
        tokens = job.data.global_batch_size * job.model.seq_length
        rollbacks = LiveRollbacks(job, trainer, checkpointer, logger, metrics, groups)
        trainer.raise_flags = rollbacks.raise_flags
        stop = StopSignal.install()
        logger.start(trainer.iteration)
        while trainer.iteration < tcfg.train_iters:
            if trainer.iteration + 1 in trainer.iterations_to_skip:  # Megatron-LM's --iterations-to-skip
                trainer.iteration += 1
                logger.info(f"> iteration {trainer.iteration}: batch skipped (--iterations-to-skip)")
                if checkpointer is not None:
                    checkpointer.skipped(trainer.iteration)
                continue
            device_ctx.synchronize()
            started = time.perf_counter()
            with trainer.phase("iteration"):
                loss, lr, grad_norm = trainer.train_step()
            device_ctx.synchronize()
            elapsed = time.perf_counter() - started
            it = trainer.iteration
            result.iterations.append(it)
            result.losses.append(loss)
            result.iteration_times.append(elapsed)
            consumed = it * job.data.global_batch_size
            if not math.isfinite(grad_norm):
                logger.info(f"> iteration {it}: gradient norm is {grad_norm}; the update was skipped "
                            f"({trainer.optimizer.skipped_steps} skipped so far)")
            logger.training_step(it, loss, lr, grad_norm, elapsed, tokens, consumed)
            logged = it % tcfg.log_interval == 0 or it == tcfg.train_iters
            if logged:
                logger.console_line(it, loss, lr, grad_norm, elapsed, tokens, consumed)
            if checkpointer is not None:
                with trainer.phase("checkpoint"):
                    checkpointer.after_step(it)
            if clock.ended_unix is None:
                engine = checkpointer.engine if checkpointer is not None else None
                clock.finish(engine.stats if engine else None, engine.flusher.how_started if engine else None)
                logger.info(clock.line())
                metrics.startup(clock.record())
            if logged:
                metrics.iteration(it, loss, lr, grad_norm, elapsed, tokens, consumed, checkpointer)
            faults.reach("iteration", it)  # fault-injection tests kill ranks here
            if rollbacks.after_step(it, grad_norm):
                continue  # in the same processes, from the step it went back to
            if trainer.valid_data is not None and it % tcfg.eval_interval == 0:
                valid_loss = trainer.evaluate()
                logger.validation(it, valid_loss)
                metrics.validation(it, valid_loss)
            if stop.requested:
                logger.info(f"> {stop.requested} received: stopping after iteration {it}")
                break
            if tcfg.exit_interval and it % tcfg.exit_interval == 0:
                logger.info(f"> exiting at iteration {it} (--exit-interval {tcfg.exit_interval})")
                break
        checkpoint_summary = None
        if checkpointer is not None:
            checkpoint_summary = checkpointer.finish(trainer.iteration, sum(result.iteration_times),
                                                     interrupted=bool(stop.requested))
            checkpointer = None
        if tracer is not None:
            path = os.path.join(tcfg.trace_dir, f"rank{groups.rank}.json")
            kept = _keep_earlier_trace(path)
            tracer.write(path)
            logger.info(f"> trace of every rank in {tcfg.trace_dir}/rank*.json (open in https://ui.perfetto.dev)"
                        + (f"; the earlier run's is kept as {os.path.basename(kept)}" if kept else ""))
        # Every rank's peak resident memory (and, on a GPU, peak device memory): one small
        # all-gather, only with a metrics file to write it to (the flag is the same on every
        # rank, so all of them or none gather).
        peak_rss, peak_device = _peak_memory_by_rank(device_ctx) if tcfg.metrics_file else (None, None)
        metrics.summary(trainer.iteration, len(result.iterations), sum(result.iteration_times), str(device_ctx.device),
                        bool(stop.requested), checkpoint_summary, peak_rss, peak_device)
        logger.info(f"> training done: {trainer.iteration} iterations")
    finally:
        if checkpointer is not None:  # an error: stop the engine's workers, keep what is in L0
            checkpointer.abort()
        logger.close()
        metrics.close()
    return result


def _keep_earlier_trace(path: str) -> str | None:
    """A resumed run writes its trace where the earlier run wrote its own: that one is renamed
    ``rank<r>-run<k>.json`` (the first free k) instead of overwritten; returns the new name."""
    if not os.path.exists(path):
        return None
    stem = path[: -len(".json")]
    k = 1
    while os.path.exists(f"{stem}-run{k}.json"):
        k += 1
    os.rename(path, f"{stem}-run{k}.json")
    return f"{stem}-run{k}.json"


def _peak_memory_by_rank(device_ctx: DeviceContext) -> tuple[list[float], list[float] | None]:
    """(:func:`peak_resident_mib` of every rank, the device's peak allocated memory of every rank
    or None on CPU), in rank order, on every rank (a tensor on the training device, so NCCL
    gathers it as gloo does)."""
    device_peak = device_ctx.peak_memory_mib()
    mine = torch.tensor([peak_resident_mib(), -1.0 if device_peak is None else device_peak], dtype=torch.float64,
                        device=device_ctx.device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        gathered = [mine]
    else:
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
    rows = [t.tolist() for t in gathered]
    return [round(r[0], 1) for r in rows], None if device_peak is None else [round(r[1], 1) for r in rows]


def shutdown() -> None:
    """Tear down process groups (end of a run, or of a test)."""
    if dist.is_initialized():
        ParallelGroups.destroy()
        dist.destroy_process_group()
