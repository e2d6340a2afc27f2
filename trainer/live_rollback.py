"""The trainer's side of rolling back in the running job: on command, and past loss spikes.

- **On command** (``scripts/rollback.sh STEP --live``): rank 0 looks for the request file between
  iterations (one ``stat``, at most every :data:`REQUEST_CHECK_SECONDS`), takes a valid one
  before the step's gradient reduction, and raises a flag that rides on the step's reductions
  (``trainer.iteration_signals``): after that step every rank knows, with no collective of its
  own. A request that is not valid is answered and set aside by rank 0 alone.
- **Past a loss spike** (``--rollback-on-spike``): the last pipeline stage, which has the loss,
  compares it with the median of the recent losses and raises the other flag; a non-finite
  gradient norm is known on every rank already. The job goes back to the newest version held at
  least ``--rollback-distance`` iterations before the spike, optionally skipping the batches up to
  it, at most ``--max-rollbacks`` times.

Both end in ``checkpointing.recovery.live_rollback.roll_back_live`` at the same iteration boundary on
every rank; what the trainer then changes (its iteration, the iterations it skips, a new LR
schedule, TensorBoard's run directory) is done here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections import deque

from checkpointing.base import faults, gather_from_all
from checkpointing.recovery import (
    LiveRollbackRefused,
    RequestRefused,
    RollbackAnswer,
    RollbackRequest,
    asked_of_another_job,
    held_steps,
    pending,
    roll_back_live,
    take_request,
    write_answer,
)
from trainer import iteration_signals

REQUEST_CHECK_SECONDS = 0.05
"""Rank 0 looks for a request file at most this often (a ``stat`` of ``--save``, which may be on
a parallel file system)."""
MIN_LOSSES = 5
"""No spike is called before this many losses are known."""


class RollbackLimitError(RuntimeError):
    """Another loss spike after ``--max-rollbacks`` rollbacks: the job stops (every checkpoint kept)."""


class SpikeDetector:
    """A loss above ``factor`` times the median of the last ``window`` losses, or not finite."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)

    def check(self, iteration: int, loss: float) -> str | None:
        """Why ``loss`` is a spike (None: it is not; it joins the window)."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if len(self.recent) >= MIN_LOSSES:
            median = statistics.median(value for _, value in self.recent)
            if loss > self.factor * median:
                return f"loss {loss:.4f} is {loss / median:.1f}x the median {median:.4f} of the last {len(self.recent)}"
        self.recent.append((iteration, loss))
        return None

    def forget_after(self, iteration: int) -> None:
        """The losses of an abandoned branch leave the window."""
        kept = [(i, v) for i, v in self.recent if i <= iteration]
        self.recent.clear()
        self.recent.extend(kept)


class LiveRollbacks:
    """One rank's rollbacks in a running job; every rank makes one, alike."""

    def __init__(self, job, trainer, checkpointer, logger, metrics, groups):
        self.cfg = job.training.rollback
        self.trainer = trainer
        self.checkpointer = checkpointer
        self.logger = logger
        self.metrics = metrics
        self.rank = groups.rank
        engine = checkpointer.engine if checkpointer is not None else None
        self.save = job.checkpoint.save if engine is not None else None
        self.watch_requests = self.rank == 0 and self.save is not None
        self.detector = (SpikeDetector(self.cfg.spike_factor, self.cfg.spike_window)
                         if self.cfg.rollback_on_spike and groups.is_last_stage else None)
        self.request: RollbackRequest | None = None
        self.spike: str | None = None
        self.automatic = 0
        """Rollbacks past spikes so far (``--max-rollbacks``)."""
        self.branches = 0
        self._next_check = 0.0
        self._paced = faults.holds("live-request")  # a test's pacing (checkpointing.base.faults); off in a real job

    # -- inside the step, before its reductions ----------------------------------------------------
    def raise_flags(self, iteration: int, loss: float) -> float:
        """Set this rank's flags for the step of ``iteration`` whose loss (on the last stage) is
        ``loss``; returns the loss as reported (``GPT_CKPT_INJECT_SPIKE`` multiplies it)."""
        signals = self.trainer.buffers.signals
        if self.watch_requests and (faults.holds("live-request", iteration) if self._paced
                                    else time.monotonic() >= self._next_check):
            self._next_check = time.monotonic() + REQUEST_CHECK_SECONDS
            if pending(self.save):
                self.request = self._take_request()
                if self.request is not None:
                    signals[iteration_signals.ROLLBACK_REQUESTED] = 1.0
        if self.detector is not None:
            loss *= faults.injected_spike(iteration)  # a test hook; 1.0 unless armed
            self.spike = self.detector.check(iteration, loss)
            if self.spike is not None:
                signals[iteration_signals.LOSS_SPIKE] = 1.0
        return loss

    def _take_request(self) -> RollbackRequest | None:
        """Rank 0: the request, checked as far as rank 0 alone can (None: refused and answered)."""
        try:
            request = take_request(self.save)
            elsewhere = asked_of_another_job(self.save, request)
            if elsewhere is not None:
                self._refuse(request.id, elsewhere, request.step)
                return None
            if request.settings:  # an LR schedule the new branch could not use is refused now
                dataclasses.replace(self.trainer.job.lr, **request.schedule_changes())
            return request
        except RequestRefused as error:
            self._refuse(error.request_id, str(error))
        except ValueError as error:
            self._refuse(request.id, f"the new learning-rate schedule is refused: {error}", request.step)
        return None

    def _refuse(self, rid: str | None, message: str, step: int | None = None) -> None:
        self.logger.info(f"WARNING: live rollback request refused: {message}; training goes on")
        if rid is not None and self.rank == 0:
            write_answer(self.save, RollbackAnswer(rid, False, message, step))

    # -- at the iteration boundary ----------------------------------------------------------------
    def after_step(self, iteration: int, grad_norm: float) -> bool:
        """After the step of ``iteration`` and its checkpoint request; returns whether the job
        rolled back (``trainer.iteration`` then names the step it went back to)."""
        flags = self.trainer.optimizer.signals
        if flags[iteration_signals.ROLLBACK_REQUESTED]:
            return self._on_request(iteration)
        spike = flags[iteration_signals.LOSS_SPIKE] or not math.isfinite(grad_norm)
        if spike and self.cfg.rollback_on_spike:
            return self._on_spike(iteration, grad_norm)
        return False

    def _on_request(self, iteration: int) -> bool:
        mine = self.request
        if mine is not None and mine.branch is None:  # one name for every rank
            mine = dataclasses.replace(mine, branch=f"rollback-{time.strftime('%Y%m%d-%H%M%S')}-from-{iteration}")
        request = gather_from_all(self.checkpointer.manager.group, mine)[0]
        self.request = None
        if request is None:  # rank 0 raised the flag, so it holds the request: a guard
            raise RuntimeError("a live rollback was flagged but rank 0 holds no request")
        self.logger.info(f"> live rollback requested at iteration {iteration}: back to {request.describe()}")
        return self._roll_back(request, iteration, "on command")

    def _on_spike(self, iteration: int, grad_norm: float) -> bool:
        reason = self.spike or f"the gradient norm is {grad_norm}"
        self.spike = None
        if self.automatic >= self.cfg.max_rollbacks:
            self.checkpointer.engine.wait_idle(drain=True)  # the queued flushes land: nothing is lost
            raise RollbackLimitError(
                f"loss spike at iteration {iteration} ({reason}) after {self.automatic} rollback(s): --max-rollbacks "
                f"{self.cfg.max_rollbacks} reached, the job stops. Every checkpoint is kept: scripts/rollback.sh --list "
                f"--save {self.save} shows them")
        in_l0, on_disk = held_steps(self.checkpointer.manager)
        latest = iteration - self.cfg.rollback_distance
        held = sorted(v for v in in_l0 | on_disk["L1"] | on_disk["L2"] if v <= latest)
        if not held:
            self.logger.info(f"WARNING: loss spike at iteration {iteration} ({reason}), but no version at or before "
                             f"iteration {latest} is held: no rollback, training goes on")
            return False
        step = held[-1]
        skips = tuple(range(step + 1, iteration + 1)) if self.cfg.skip_batches_on_rollback else ()
        self.logger.info(f"> loss spike at iteration {iteration} ({reason}): rolling back to iteration {step}"
                         + (f", skipping the batches of iterations {step + 1}-{iteration}" if skips else ""))
        branch = gather_from_all(self.checkpointer.manager.group,
                                 f"spike-{time.strftime('%Y%m%d-%H%M%S')}-at-{iteration}")[0]
        request = RollbackRequest(step=step, id=f"spike-{iteration}", branch=branch, iterations_to_skip=skips)
        done = self._roll_back(request, iteration, f"loss spike at iteration {iteration}")
        if done:
            self.automatic += 1
            if self.detector is not None:
                self.detector.forget_after(step)
        return done

    def _roll_back(self, request: RollbackRequest, iteration: int, reason: str) -> bool:
        trainer = self.trainer
        try:
            self.checkpointer.state.schedule_from_checkpoint = True
            with trainer.phase("rollback"):  # the stall timeline shows it, with its cost
                done = roll_back_live(self.checkpointer.manager, request.step, iteration, request.branch)
        except LiveRollbackRefused as error:
            self._refuse(request.id if reason == "on command" else None, str(error), request.step)
            return False
        finally:
            self.checkpointer.state.schedule_from_checkpoint = False
        trainer.iteration = request.step
        trainer.iterations_to_skip |= set(request.iterations_to_skip)
        job = trainer.job
        rollback = dataclasses.replace(job.training.rollback,
                                       iterations_to_skip=tuple(sorted(trainer.iterations_to_skip)))
        trainer.job = dataclasses.replace(job, lr=dataclasses.replace(job.lr, **request.schedule_changes()),
                                          training=dataclasses.replace(job.training, rollback=rollback))
        self.checkpointer.state.job_changed()
        # L0 describes the step again with the new branch's small state (its skips, its LR
        # schedule), so a restart before the branch's first new version resumes with them.
        self.checkpointer.engine.request(request.step, l0_only=True)
        self.checkpointer.engine.wait_idle(drain=False)  # its description written before training goes on
        self.checkpointer.manager.last_saved = request.step
        for note in done.notes:
            self.logger.info(f"> {note}")
        self.branches += 1
        self.logger.new_branch(f"branch-{self.branches}")
        if self.logger.writer is not None:  # the new branch's run starts with the rollback and its cost
            self.logger.writer.add_scalar("rollback/seconds", done.seconds, request.step)
            self.logger.writer.add_scalar("rollback/from-iteration", iteration, request.step)
        if self.checkpointer.telemetry is not None:
            self.checkpointer.telemetry.writer = self.logger.writer
        moved = (f"{done.moved} later checkpoint(s) moved to branches/{done.branch}/" if done.moved
                 else f"no later checkpoint on disk (branch {done.branch})")
        message = (f"rolled back from iteration {iteration} to {request.step} in {done.seconds:.2f} s (state from "
                   f"{done.source}; {done.drain_seconds:.2f} s of it finishing flushes); {moved}; training goes on "
                   f"at iteration {request.step + 1}")
        self.logger.info(f"> {message}")
        self.metrics.rollback({"from_iteration": iteration, "step": request.step, "source": done.source,
                               "seconds": done.seconds, "drain_seconds": done.drain_seconds, "reason": reason,
                               "branch": done.branch, "skipped": list(request.iterations_to_skip),
                               "pid": os.getpid(), "flusher_pid": self.checkpointer.engine.flusher_pid})
        if self.rank == 0 and reason == "on command":
            write_answer(self.save, RollbackAnswer(request.id, True, message, request.step, done.source, done.seconds))
        return True
