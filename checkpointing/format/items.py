"""What a rank hands to the checkpoint layer: flat arrays, their pieces, and its small state.

The checkpoint layer never sees a model or an optimizer. A rank describes its state as

- a few flat 1-D arrays (fp32 main parameters, Adam moments, ...), cut into **shards** (element
  ranges, identical for every array): the unit the async engine copies and fences on;
- :class:`TensorPiece` records, each a rectangle of a global tensor stored contiguously in one
  of those arrays: the basis of the reshardable format;
- its **small state**: a dict of small picklable items (``checkpointing.format.keys``: the ``common``
  item every rank shares, with the iteration and the run's arguments, and each rank's RNG states),
  each stored as a byte item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from checkpointing.base.parallel_layout import ParallelLayout


@dataclass(frozen=True)
class TensorPiece:
    """A rectangle of a global tensor that lies contiguously in one flat array."""

    key: str
    """Name of the global tensor in the checkpoint, e.g. ``optimizer.state.exp_avg.<param>``."""
    array: str
    """Name of the flat array holding it."""
    start: int
    """First element in that array."""
    shape: tuple[int, ...]
    """Shape of the rectangle."""
    global_shape: tuple[int, ...]
    """Shape of the whole global tensor."""
    global_offset: tuple[int, ...]
    """Where the rectangle starts in the global tensor."""
    is_writer: bool = True
    """Exactly one rank of a job writes each element of each global tensor."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def view(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """This piece's elements in ``arrays`` as a tensor of ``shape`` (a view, no copy)."""
        return arrays[self.array][self.start : self.start + self.numel].view(self.shape)


@dataclass(frozen=True)
class LoadedParts:
    """What a load put back into the state; its ``after_load`` hook re-syncs the trainer from it.

    Every load path (L0 host memory, a node-local directory, the shared level) ends with one
    call of that hook, so no path can leave a copy of the weights stale."""

    iteration: int
    """The iteration of the checkpoint that was read."""
    source: str
    """Where it came from: ``L0``, ``L1`` or ``L2`` (also a synchronous ``--save``)."""
    weights_in_arrays: bool
    """True: the weights came back in ``arrays`` (the main weights: an L0 snapshot, a node-local
    file, or a shared load with optimizer state), so the model's parameters are derived from
    them. False: only the model's parameters were read (``load_arrays``), and the main weights
    are derived from them."""
    optimizer: bool
    """The optimizer state (moments, step counts) was restored; False: it starts afresh
    (``--no-load-optim``, ``--finetune``)."""
    rng: bool
    """Restore the RNG states of the small state (same layout, not ``--no-load-rng``/``--finetune``)."""
    resume: bool = True
    """Continue the saved run (its iteration and data position); False: start at iteration 0
    with the loaded weights (``--finetune``)."""


class CheckpointableState(Protocol):
    """What a trainer exposes to the checkpoint layer (see ``trainer/checkpoint_state.py``)."""

    arrays: dict[str, torch.Tensor]
    """Live flat arrays a checkpoint copies; all of the same length."""
    shards: list[tuple[int, int]]
    """Element ranges of the arrays, in the order the optimizer updates them."""
    save_pieces: list[TensorPiece]
    """Pieces of ``arrays`` this rank saves (``is_writer`` ones are written)."""
    load_arrays: dict[str, torch.Tensor]
    """Live arrays a load writes into (may differ from ``arrays``, e.g. the model's parameters)."""
    load_pieces: list[TensorPiece]
    """Pieces of ``load_arrays`` this rank reads: the model's (every local parameter, replicas
    included) and the optimizer's (keys under ``checkpointing.format.keys.OPTIMIZER_PREFIX``)."""
    layout: ParallelLayout
    """How the state is split over the ranks; a rank's own bytes (an L0 snapshot, a node-local
    file) restore only into the layout that took them."""
    zero_copy_refusal: str | None
    """Why the state's owner cannot write each step into a host-pool slot (zero-copy snapshots:
    ``CheckpointEngine.begin_step``); None: it can."""
    legacy_padded_keys: frozenset[str]
    """Global tensors a format-1 checkpoint may store with more rows than ``global_shape[0]``
    (Megatron's vocabulary padding); their first rows are the true ones."""

    def capture_small_state(self, iteration: int) -> dict[str, Any]:
        """The small state after ``iteration`` (copied at once: it is small)."""

    def model_flag_differences(self, saved_args: dict) -> list[str]:
        """``--flag: saved, now`` for each model setting the checkpoint's recorded arguments
        (``common["args"]``) give otherwise than this run (for a mismatch's message)."""

    def adopt_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        """Zero-copy snapshots: the state's ``arrays`` are from now on these (a host-pool slot's),
        as after a step that wrote them (a live rollback to a version held in L0)."""

    def after_load(self, small_state: dict[str, Any], loaded: LoadedParts) -> list[str]:
        """Put the small state back and re-sync the trainer after any load; returns notes for
        the user (what was not restored, which settings differ from the saved run's). Raises
        ``CheckpointMismatchError`` if the checkpoint is of another model."""
