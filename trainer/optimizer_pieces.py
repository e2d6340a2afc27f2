"""Each piece of the optimizer's flat state as a rectangle of a global parameter tensor.

The optimizer's shards end on parameter row boundaries, so the part of a shard that belongs to
one parameter is whole rows of that (local) parameter, which is itself a rectangle of the global
tensor (megatron-core's sharded metadata says where). This module computes those rectangles: the
basis of a checkpoint format in which main parameters and Adam moments are stored as global
per-parameter tensors, loadable into any TP/PP/DP layout.
"""

from __future__ import annotations

from checkpointing.format import TensorPiece
from models.param_layout import GlobalParamSpec
from trainer.flat_buffers import RowGeometry
from trainer.optimizer import DistributedAdam


def optimizer_state_pieces(
    optimizer: DistributedAdam, specs: dict[str, GlobalParamSpec], dp_rank: int
) -> list[TensorPiece]:
    """The pieces of this rank's optimizer state, shard by shard, in flat order.

    Each is keyed by the parameter's global name and lies in the optimizer's own arrays
    (``array="fp32_param"``; ``start`` counts from the optimizer's first element, so the same
    piece with another ``array`` names the same rows of ``exp_avg`` or ``exp_avg_sq``).
    """
    return shard_pieces(optimizer.buffers, [(s.start, s.end) for s in optimizer.shards], optimizer.start,
                        optimizer.distributed, specs, dp_rank)


def shard_pieces(geometry: RowGeometry, shards: list[tuple[int, int]], optimizer_start: int, distributed: bool,
                 specs: dict[str, GlobalParamSpec], dp_rank: int) -> list[TensorPiece]:
    """:func:`optimizer_state_pieces` from the flat layout alone (no optimizer, no tensor): the
    trainer and the scale simulator (``benchmarks.scale``) cut pieces with this one function."""
    pieces: list[TensorPiece] = []
    for index, (shard_start, shard_end) in enumerate(shards):
        for a, b in geometry.segments(shard_start, shard_end, lambda _span: True, merge=False):
            span = geometry.span_at(a)
            spec = specs[span.name]
            first_row, rest_a = divmod(a - span.start, span.row_numel)
            end_row, rest_b = divmod(b - span.start, span.row_numel)
            if rest_a or rest_b:
                raise ValueError(
                    f"optimizer shard {index} [{shard_start}, {shard_end}) cuts {span.name} "
                    f"inside a row; shard boundaries must fall on row boundaries"
                )
            shape = span.shape if len(span.shape) == 0 else (end_row - first_row, *span.shape[1:])
            offset = (spec.global_offset[0] + first_row, *spec.global_offset[1:])
            pieces.append(
                TensorPiece(
                    key=spec.global_name,
                    array="fp32_param",
                    start=a - optimizer_start,
                    shape=tuple(shape),
                    global_shape=spec.global_shape,
                    global_offset=offset,
                    is_writer=spec.is_main_model_parallel_replica and (distributed or dp_rank == 0),
                )
            )
    return pieces
