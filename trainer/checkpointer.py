"""The trainer's side of checkpointing: its state for the checkpoint layer, and the fences.

The load and save policy lives in :class:`checkpointing.manager.CheckpointManager`; this adapter
builds the trainer's :class:`TrainerCheckpointState`, hooks the engine's per-shard fences into
the optimizer step, and reports the engine's counters to TensorBoard.
"""

from __future__ import annotations

import torch

from checkpointing.base import CheckpointConfig
from checkpointing.manager import CheckpointManager
from trainer.checkpoint_state import TrainerCheckpointState


class _PoolVersions:
    """The optimizer's :class:`trainer.optimizer.VersionStore` over the engine's pool."""

    def __init__(self, engine):
        self.engine = engine

    def begin(self) -> dict[str, torch.Tensor]:
        return self.engine.begin_step()

    def commit(self) -> None:
        self.engine.end_step()


class Checkpointer:
    """Owns this rank's checkpointing for one run."""

    def __init__(self, cfg: CheckpointConfig, trainer, logger, tracer=None, telemetry: bool = False):
        """``telemetry``: report the engine's counters to TensorBoard each iteration (every rank
        must pass the same value: it is a collective)."""
        self.state = TrainerCheckpointState(trainer)
        self.manager = CheckpointManager(cfg, self.state, logger.info, tracer, trainer.job.training.trace_dir)
        self.engine = self.manager.engine
        if self.engine is not None:
            # The fence: before the optimizer overwrites a shard, its snapshot copy must be done
            # (zero-copy: a flush of the slot it writes must have read it).
            trainer.optimizer.before_shard_update.append(lambda shard: self.engine.fence(shard.index))
            if self.engine.zero_copy:
                trainer.optimizer.versions = _PoolVersions(self.engine)
        self.telemetry = None
        if self.engine is not None and telemetry:
            import torch.distributed as dist

            from trainer.checkpoint_telemetry import CheckpointTelemetry

            self.telemetry = CheckpointTelemetry(self.engine, logger.writer, dist.new_group(backend="gloo"))

    def load(self) -> int:
        """Load per the configuration; returns the iteration training goes on from."""
        return self.manager.load()

    def after_step(self, iteration: int) -> None:
        """Called after the optimizer step of ``iteration``."""
        self.manager.after_step(iteration)
        if self.telemetry is not None:
            self.telemetry.after_step(iteration)

    def skipped(self, iteration: int) -> None:
        """``iteration`` was skipped (``--iterations-to-skip``): the next step is ``iteration + 1``'s."""
        if self.engine is not None:
            self.engine.set_iteration(iteration + 1)

    def finish(self, iteration: int, train_seconds: float = 0.0, interrupted: bool = False) -> dict | None:
        """The final save and drain; returns the end-of-run summary's numbers (None: no summary)."""
        return self.manager.finish(iteration, train_seconds, interrupted)

    def abort(self) -> None:
        self.manager.abort()
