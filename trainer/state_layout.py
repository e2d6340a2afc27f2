"""Each piece of the optimizer's flat state as a rectangle of a global parameter tensor.

The optimizer's shards end on parameter row boundaries, so the part of a shard that belongs to
one parameter is whole rows of that (local) parameter, which is itself a rectangle of the global
tensor (megatron-core's sharded metadata says where). This module computes those rectangles: the
basis of a checkpoint format in which main parameters and Adam moments are stored as global
per-parameter tensors, loadable into any TP/PP/DP layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.param_layout import GlobalParamSpec
from trainer.optimizer import DistributedAdam


@dataclass(frozen=True)
class StatePiece:
    """Rows of one parameter held in one optimizer shard."""

    global_name: str
    """The parameter's layout-independent name."""
    global_shape: tuple[int, ...]
    """Shape of the whole parameter."""
    global_offset: tuple[int, ...]
    """Where this piece starts in the global tensor."""
    shape: tuple[int, ...]
    """Shape of this piece (a rectangle)."""
    start: int
    """First element in flat-buffer coordinates (the optimizer's ``main_params`` start at its
    ``start``)."""
    shard_index: int
    """The optimizer shard that holds it."""
    is_writer: bool
    """Exactly one rank of the job has True for each element of each global tensor."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def optimizer_state_pieces(
    optimizer: DistributedAdam, specs: dict[str, GlobalParamSpec], dp_rank: int
) -> list[StatePiece]:
    """The pieces of this rank's optimizer state, shard by shard, in flat order."""
    buffers = optimizer.buffers
    pieces: list[StatePiece] = []
    for shard in optimizer.shards:
        for a, b in buffers.segments(shard.start, shard.end, lambda _slot: True, merge=False):
            slot = buffers.slot_at(a)
            spec = specs[slot.name]
            first_row, rest_a = divmod(a - slot.start, slot.row_numel)
            end_row, rest_b = divmod(b - slot.start, slot.row_numel)
            if rest_a or rest_b:
                raise ValueError(
                    f"optimizer shard {shard.index} [{shard.start}, {shard.end}) cuts {slot.name} "
                    f"inside a row; shard boundaries must fall on row boundaries"
                )
            shape = slot.shape if len(slot.shape) == 0 else (end_row - first_row, *slot.shape[1:])
            offset = (spec.global_offset[0] + first_row, *spec.global_offset[1:])
            pieces.append(
                StatePiece(
                    global_name=spec.global_name,
                    global_shape=spec.global_shape,
                    global_offset=offset,
                    shape=tuple(shape),
                    start=a,
                    shard_index=shard.index,
                    is_writer=spec.is_main_model_parallel_replica and (optimizer.distributed or dp_rank == 0),
                )
            )
    return pieces
