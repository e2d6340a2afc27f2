"""What a rank hands to the checkpoint layer: flat arrays, their pieces, and small objects.

The checkpoint layer never sees a model or an optimizer. A rank describes its state as

- a few flat 1-D arrays (fp32 main parameters, Adam moments, ...), cut into **shards** (element
  ranges, identical for every array): the unit the async engine copies and fences on;
- :class:`TensorPiece` records, each a rectangle of a global tensor stored contiguously in one
  of those arrays: the basis of the reshardable format;
- a dict of small picklable objects (iteration, RNG states, arguments) stored as byte items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch


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
    """Pieces of ``load_arrays`` this rank reads."""

    def capture_objects(self, iteration: int) -> dict[str, Any]:
        """Small objects of the state after ``iteration`` (copied at once, they are small)."""

    def objects_to_load(self) -> list[str]:
        """Keys of the small objects this rank needs back."""

    def restore_objects(self, objects: dict[str, Any]) -> str | None:
        """Put loaded small objects back into the trainer; returns a note for the user about what
        could not be restored (e.g. device RNG states across devices), or None."""
