"""Typed checkpoint errors; each message names the file, tensor or rank and what to do."""

from __future__ import annotations

from checkpointing.base.durable import CheckpointWriteError

__all__ = [
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointUntrustedError",
    "CheckpointWriteError",
    "FlusherError",
]


class CheckpointError(RuntimeError):
    """Base class of the errors a checkpoint load raises."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint's bytes differ from what was written (flipped, truncated, missing)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds another model (shapes or tensors differ); never fallen back from."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint this run can load: the asked-for step (``--ckpt-step``) has none,
    or none fits this run (a node-local one saved in another layout)."""


class CheckpointUntrustedError(CheckpointError):
    """A checkpoint file would run code to be read (a pickle naming something other than data);
    refused unless the user vouches for the checkpoint (``--trust-checkpoint-pickles``)."""


class FlusherError(CheckpointError):
    """This rank's flusher process died, stopped answering, or failed: checkpointing cannot go
    on, so training stops (the L0 pool is kept for the restart)."""
