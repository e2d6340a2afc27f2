"""The checkpoint manager: one rank's load and save policy for one run.

What to resume from, and how: :class:`checkpointing.recovery.loading.CheckpointLoader` (candidates across
levels, one loop over them, a refusal that names its reason). The manager drops the L0 versions
the load did not keep.

When to save: at ``--save-interval`` (through the engine with ``--async-save``, else a
synchronous save), and once at the end of the run; then a summary of what checkpointing cost.

The manager sees the trainer only through :class:`checkpointing.format.items.CheckpointableState`.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from typing import Callable

import torch.distributed as dist

from checkpointing.base.agreement import gather_from_all
from checkpointing.base.config import CheckpointConfig
from checkpointing.base.levels import sync_level
from checkpointing.base.private_files import open_own
from checkpointing.engine.engine_stats import idle_and_steal, machine_cpu_times
from checkpointing.engine.run_report import rank_numbers, summary_lines
from checkpointing.format.commit import save_and_commit
from checkpointing.format.items import CheckpointableState
from checkpointing.recovery.loading import CheckpointLoader
from checkpointing.storage.peers import directory_peers


class SaveDirError(OSError):
    """A checkpoint directory cannot be written; raised at start-up, before the model is built."""


def probe_writable(directory: str, rank: int) -> None:
    """Create ``directory`` and a file in it, or raise naming the directory, the rank and what
    to do: free space where the disk is full, fix permissions where it is not writable."""
    probe = os.path.join(directory, f".write-probe-{rank}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(directory, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
        finally:
            if os.path.lexists(probe):
                os.unlink(probe)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            todo = (f"free space there (uncommitted iter_* directories, old checkpoints: scripts/rollback.sh "
                    f"--list --save {directory}) or pass another directory")
        else:
            todo = "fix its permissions or pass another directory"
        raise SaveDirError(error.errno, f"rank {rank}: checkpoint directory {directory} is not writable "
                                        f"({error.strerror or error}); {todo}") from None


def claim_checkpoint_dirs(cfg: CheckpointConfig, rank: int, group=None) -> None:
    """Every rank checks the directories it will write and locks them for this job
    (:mod:`checkpointing.base.job_lock`), before any heavy work and before anything is read. Collective
    over ``group`` (None: the default group): a refusal on any rank is raised on every rank."""
    from checkpointing.base import job_lock, private_files
    from checkpointing.format.discovery import megatron_checkpoint_in
    from checkpointing.storage import host_pool

    error: tuple[bool, str] | None = None
    """(whether another job holds it, the message)"""
    try:
        for flag, path, wanted in (("--load", cfg.load, "the directory that holds the checkpoints (iter_NNNNNNN/)"),
                                   ("--ckpt-host-dir", cfg.host_dir if cfg.async_save else None,
                                    "a tmpfs directory such as /dev/shm")):
            if path and os.path.lexists(path) and not os.path.isdir(path):
                raise SaveDirError(errno.ENOTDIR, f"rank {rank}: {flag} {path} is not a directory; pass {wanted}")
        if cfg.load and not os.path.lexists(cfg.load) and not _same_path(cfg.load, cfg.save):
            # A misspelled --load would otherwise start from scratch with one easy-to-miss line.
            raise SaveDirError(errno.ENOENT, f"--load {cfg.load} does not exist; check the path. A fresh run "
                                             "leaves --load out, or gives it the same directory as --save")
        megatron = megatron_checkpoint_in(cfg.load) if cfg.load and os.path.isdir(cfg.load) else None
        if megatron is not None:
            raise SaveDirError(f"--load {cfg.load}: {megatron} is a Megatron-LM torch_dist checkpoint; "
                                             f"convert it first: scripts/convert_checkpoint.py --from megatron "
                                             f"{cfg.load} NEW_DIR, then --load NEW_DIR --finetune")
        for directory in (cfg.save, cfg.local_dir):
            if directory:
                probe_writable(directory, rank)
        if cfg.save and rank == 0:
            job_lock.hold(job_lock.lock_path_for_save(cfg.save), f"--save {cfg.save}")
        if cfg.local_dir:
            job_lock.hold(job_lock.lock_path_for_local(cfg.local_dir, rank), f"--ckpt-local-dir {cfg.local_dir}")
        if cfg.async_save:
            pool, refused = private_files.usual_pool_dir(cfg.host_dir)
            if refused is None:  # else the pool goes to a fresh directory of this process's (said when it opens)
                job_lock.hold(host_pool.lock_path(pool, host_pool.job_tag(cfg.save), rank),
                              f"the L0 pool of --save {cfg.save} in {pool}")
    except (OSError, job_lock.CheckpointInUseError) as refused:
        message = str(refused) if str(refused).startswith("rank ") else f"rank {rank}: {refused}"
        error = (isinstance(refused, job_lock.CheckpointInUseError), message)
    errors = [e for e in (gather_from_all(group, error) if dist.is_initialized() else [error]) if e]
    if errors:
        in_use, message = errors[0]
        raise job_lock.CheckpointInUseError(message) if in_use else SaveDirError(message)


def _same_path(a: str, b: str | None) -> bool:
    return b is not None and os.path.abspath(a) == os.path.abspath(b)


class CheckpointManager:
    """This rank's checkpointing for one run; every rank of the job makes one, alike."""

    def __init__(self, cfg: CheckpointConfig, state: CheckpointableState, log: Callable[[str], None],
                 tracer=None, trace_dir: str | None = None):
        """``log``: prints on the logging rank (a no-op elsewhere); ``trace_dir``: where the
        end-of-run statistics go beside the tracer's timeline (with ``tracer``)."""
        self.cfg = cfg
        self.state = state
        self.log = log
        self.tracer = tracer
        self.trace_dir = trace_dir
        self.rank = dist.get_rank()
        # A gloo group of its own: checkpoint metadata are CPU objects (the engine's flusher
        # processes have a group of their own).
        self.group = dist.new_group(backend="gloo")
        self.last_saved: int | None = None
        self.loaded: int | None = None
        """The iteration training starts from after :meth:`load` (0: from scratch or fine-tuning);
        nothing new to save while unchanged."""
        self.local_peers = self._find_peers()
        self._cpu_started = time.process_time()
        self._machine_started = machine_cpu_times()
        self._last_step_at: float | None = None
        self._work_since_last_step = False
        self.iteration_seconds: dict[bool, list[float]] = {True: [], False: []}
        """Wall time from one ``after_step`` to the next (training, logging and checkpointing
        together), by whether checkpoint work ran in that time (a save, a copy, a flush)."""
        self.engine = None
        self.memory = None
        """A version staged from host memory for the load (``checkpointing.recovery.memory_recovery``)."""
        if cfg.async_save and cfg.load:  # before the engine opens its pool over the slot files
            from checkpointing.recovery.memory_recovery import prepare

            self.memory = prepare(cfg, state, self.group, log)
        if cfg.async_save:
            from checkpointing.engine.engine_setup import engine_for_config

            self.engine = engine_for_config(cfg, state, self.group, log, tracer, self.local_peers)

    def _find_peers(self) -> list[int] | None:
        """Which ranks share this rank's L1 directory (its node); checks that L2 is shared."""
        world = dist.get_world_size(self.group)
        if self.cfg.save and world > 1:
            shared = directory_peers(self.cfg.save, self.group)
            if len(shared) < world:
                self.log(f"WARNING: --save {self.cfg.save} is not the same directory on every rank (rank "
                         f"{dist.get_rank(self.group)} shares it with ranks {shared} only); L2 must be a file "
                         "system all nodes share, or its checkpoints cannot be committed whole")
        if not self.cfg.local_dir or world == 1:
            return None
        peers = directory_peers(self.cfg.local_dir, self.group)
        nodes = len({tuple(p) for p in gather_from_all(self.group, peers)})
        if nodes > 1:
            self.log(f"> checkpoint: L1 {self.cfg.local_dir} is node-local ({nodes} nodes); each node keeps "
                     "its own ranks' files, and restores from it only in the same layout")
        return peers

    # -- load ---------------------------------------------------------------------------------------
    def load(self) -> int:
        """Load the newest committed checkpoint this run can use (``checkpointing.recovery.loading``);
        returns the iteration training goes on from (0: from scratch, or ``--finetune``).

        With the engine, a version in host memory (L0) that survived the previous run is taken
        when it is at least as new as anything on disk; every other L0 version is dropped then
        (all of them after ``--finetune``: the new run's versions restart from 0).
        """
        kept = None
        if self.memory is not None:
            for line in self.memory.lines:
                self.log(line)
        try:
            start, kept = CheckpointLoader(self.cfg, self.state, self.group, self.log, self.engine, self.memory).load()
        finally:
            if self.engine is not None:
                self.engine.keep_only(kept)
            if self.memory is not None:
                self.memory.remove()
                self.memory = None
        self.loaded = start
        return start

    # -- save ---------------------------------------------------------------------------------------
    def after_step(self, iteration: int) -> None:
        """Called after the optimizer step of ``iteration``."""
        cfg = self.cfg
        now = time.perf_counter()
        if self._last_step_at is not None:
            self.iteration_seconds[self._work_since_last_step].append(now - self._last_step_at)
        saved = bool(cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0)
        if saved:
            self.save(iteration)
        if self.engine is not None:
            self.engine.set_iteration(iteration + 1)
        # The next interval runs beside checkpoint work if this one saved, or the engine is busy.
        self._work_since_last_step = saved or (self.engine is not None and self.engine.active())
        self._last_step_at = now if not saved or self.engine is not None else time.perf_counter()

    def save(self, iteration: int) -> None:
        if self.engine is not None:
            self.engine.request(iteration)
        else:
            self.save_sync(iteration)
        self.last_saved = iteration

    def save_sync(self, iteration: int) -> None:
        """Copy the state to host memory and write it to ``--save`` now (no engine; ``.cpu()``
        waits for the device's pending work on the state)."""
        self.log(f"> saving checkpoint at iteration {iteration:7d} to {self.cfg.save}")
        arrays = {name: a.detach().cpu() for name, a in self.state.arrays.items()}
        result = save_and_commit(sync_level(self.cfg.save, self.cfg.save_retain_last), iteration, arrays,
                                 self.state.save_pieces, self.state.capture_small_state(iteration), self.state.layout,
                                 self.group)
        self.log(f"  successfully saved checkpoint at iteration {iteration:7d} to {self.cfg.save} "
                 f"[ {result.seconds * 1000:.0f} ms, {result.bytes_written / 1e6:.1f} MB on the logging rank ]")

    def finish(self, iteration: int, train_seconds: float = 0.0, interrupted: bool = False) -> dict | None:
        """Save the final state to ``--save`` (unless just saved there); drain the engine's levels;
        print the end-of-run summary; free the L0 pool once the final version is committed on
        every level, unless ``interrupted`` (SIGTERM: the job will be resumed, maybe here) or
        ``--ckpt-keep-host-pool``. Returns the numbers the summary was made of (``_summary``;
        None when there was no summary)."""
        if iteration == self.loaded and self.last_saved is None:
            self.log(f"> nothing trained since iteration {iteration} was loaded: no new checkpoint")
            if self.engine is not None:
                self.engine.close(drain=True)
            return
        if self.engine is not None:
            if self.last_saved == iteration:
                self.engine.flush_everywhere(iteration)
            else:
                self.engine.request(iteration, force_flush=True)
            self.engine.close(drain=True)
            summary = self._summary(train_seconds)
            self._free_pool(iteration, interrupted)
            return summary
        elif self.cfg.save and self.last_saved != iteration:
            self.save(iteration)

    def _free_pool(self, iteration: int, interrupted: bool) -> None:
        """The pool is RAM: free it at a normal end once every rank has the final version on
        every level; keep it when asked, after SIGTERM, or if a final flush failed anywhere."""
        done = {f.level for f in self.engine.stats.flushes if f.version == iteration and f.error is None}
        committed = all(gather_from_all(self.group, done >= {lv.name for lv in self.engine.levels}))
        if self.cfg.keep_host_pool or interrupted or not committed:
            why = ("--ckpt-keep-host-pool" if self.cfg.keep_host_pool else "stopped by a signal" if interrupted
                   else f"iteration {iteration} is not on every level")
            self.log(f"> L0 pool kept in shared memory ({why}): python -m checkpointing.storage.host_pool --list shows it")
            return
        from checkpointing.storage.host_pool import remove_pool

        freed = remove_pool(self.engine.pool)
        from checkpointing.base import job_lock

        job_lock.drop(self.engine.pool.lock_path)
        self.log(f"> L0 pool freed ({freed / 2**20:.1f} MiB of shared memory on the logging rank; "
                 "--ckpt-keep-host-pool keeps it)")

    def abort(self) -> None:
        """After an error in training: stop background work without draining (L0 keeps its data)."""
        if self.engine is not None:
            self.engine.close(drain=False)

    def _summary(self, train_seconds: float) -> dict:
        """Gather every rank's numbers; the logging rank prints the summary
        (``checkpointing.engine.run_report``). With a tracer, each rank's numbers go beside its trace.
        Returns what the summary was made of: the arguments of ``summary_lines`` but ``mine``,
        every rank's numbers as ``ranks`` (for ``--metrics-file``)."""
        stats = self.engine.stats
        mine = rank_numbers(self.rank, stats, time.process_time() - self._cpu_started, self.iteration_seconds,
                            sum(a.numel() * a.element_size() for a in self.state.arrays.values()))
        if self.tracer is not None and self.trace_dir:
            with open_own(os.path.join(self.trace_dir, f"checkpoint-stats-rank{mine['rank']}.json"), "w") as f:
                json.dump(mine, f)
        everyone = gather_from_all(self.group, mine)
        run = {"levels": [lv.name for lv in self.engine.levels], "train_seconds": train_seconds,
               "zero_copy": self.engine.zero_copy, "bytes_copied": stats.bytes_copied,
               "machine": idle_and_steal(self._machine_started, machine_cpu_times()), "cpus": os.cpu_count()}
        for line in summary_lines(everyone, mine, **run):
            self.log(line)
        return dict(run, ranks=everyone)
