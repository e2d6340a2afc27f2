"""Where each local parameter sits in its global tensor, from megatron-core's metadata.

megatron-core's ``sharded_state_dict()`` describes every local parameter as a rectangle
(``global_offset`` + ``local_shape``) of a global tensor (``key`` + ``global_shape``); the layers
of a transformer block are stacked along extra leading axes (``prepend_axis_num``). This module
turns that into one :class:`GlobalParamSpec` per local parameter, with the stacked axes folded
into the name (``decoder.layers.3.mlp.linear_fc1.weight``), so that a parameter's identity and
values do not depend on the TP/PP layout. Deterministic initialisation and checkpoint
resharding both stand on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalParamSpec:
    """One local parameter as a rectangle of a global tensor."""

    global_name: str
    """Layout-independent name, e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``."""
    global_shape: tuple[int, ...]
    """Shape of the whole tensor across all TP ranks."""
    global_offset: tuple[int, ...]
    """Offset of the local rectangle in the global tensor, per dimension, in elements."""
    local_shape: tuple[int, ...]
    """Shape of the local rectangle: the local parameter's shape, or a view of it with the same
    elements (SwiGLU's fused ``linear_fc1``: ``(2, rows, ...)``, see :func:`_swiglu_spec`)."""
    replica_id: tuple[int, ...]
    """megatron-core's replica id: (tied copy, TP replica, DP replica); all zero on the one
    rank that is the main holder of this rectangle."""

    @property
    def is_main_replica(self) -> bool:
        """True on exactly one rank per rectangle of the model's parameters."""
        return all(r == 0 for r in self.replica_id)

    @property
    def is_main_model_parallel_replica(self) -> bool:
        """True on one rank per rectangle within each data-parallel replica: not the last
        stage's tied copy of the embeddings, not a TP rank's copy of a replicated tensor."""
        return all(r == 0 for r in self.replica_id[:2])

    def slices(self) -> tuple[slice, ...]:
        """Index of the local rectangle in the global tensor."""
        return tuple(slice(o, o + s) for o, s in zip(self.global_offset, self.local_shape))


def _global_name(key: str, layer_offsets: tuple[int, ...]) -> str:
    """Fold stacked-layer offsets back into the key: ``decoder.layers.X`` -> ``decoder.layers.3.X``."""
    if not layer_offsets:
        return key
    marker = "layers."
    at = key.find(marker)
    if at < 0:
        raise ValueError(f"sharded key {key!r} has stacked axes but no 'layers.' segment")
    head, tail = key[: at + len(marker)], key[at + len(marker) :]
    return head + ".".join(str(o) for o in layer_offsets) + "." + tail


def _spec(entry) -> GlobalParamSpec:
    if entry.flattened_range is not None:
        raise ValueError(f"{entry.key}: flattened shards are not expected from the model")
    n = entry.prepend_axis_num
    replica = entry.replica_id if isinstance(entry.replica_id, tuple) else (entry.replica_id,)
    return GlobalParamSpec(
        global_name=_global_name(entry.key, tuple(entry.global_offset[:n])),
        global_shape=tuple(entry.global_shape[n:]),
        global_offset=tuple(entry.global_offset[n:]),
        local_shape=tuple(entry.local_shape),
        replica_id=tuple(int(r) for r in replica),
    )


def _swiglu_spec(factory) -> GlobalParamSpec:
    """SwiGLU's ``linear_fc1`` as one rectangle of a ``(2, ffn, ...)`` global tensor.

    Each TP rank holds ``[gate rows; up rows]`` of its column slice, so the TP ranks' parameters
    side by side are not the single-process one (``[all gate rows; all up rows]``). megatron-core
    describes the local parameter as two rectangles of a ``(2 * ffn, ...)`` tensor; stacking gate
    and up on a new leading axis makes it one rectangle, ``[0:2, slice, ...]``, of a view with the
    same elements, so resharding and the optimizer's row-wise shards work as for any parameter.
    """
    gate, up = factory.build()
    gate_spec, up_spec = _spec(gate), _spec(up)
    rows = gate_spec.global_shape[0] // 2
    if up_spec.global_offset[0] != gate_spec.global_offset[0] + rows or gate_spec.local_shape != up_spec.local_shape:
        raise ValueError(f"{factory.key}: megatron-core's SwiGLU shards are not [gate; up] halves as expected")
    return GlobalParamSpec(
        global_name=gate_spec.global_name,
        global_shape=(2, rows, *gate_spec.global_shape[1:]),
        global_offset=(0, *gate_spec.global_offset),
        local_shape=(2, *gate_spec.local_shape),
        replica_id=gate_spec.replica_id,
    )


def global_param_specs(model: torch.nn.Module) -> dict[str, GlobalParamSpec]:
    """Map each local parameter name of ``model`` (a megatron-core module) to its global spec."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_pointer = {p.data_ptr(): name for name, p in model.named_parameters()}
    specs: dict[str, GlobalParamSpec] = {}
    for entry in model.sharded_state_dict().values():
        if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)) or entry.data is None:
            continue
        local_name = by_pointer.get(entry.data.data_ptr())
        if local_name is None:
            continue  # a buffer, not a parameter
        if isinstance(entry, ShardedTensorFactory):
            if not entry.key.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
                raise ValueError(f"{entry.key}: a sharded-tensor factory this project does not know how to lay out")
            specs[local_name] = _swiglu_spec(entry)
        else:
            specs[local_name] = _spec(entry)
    missing = [name for name, _ in model.named_parameters() if name not in specs]
    if missing:
        raise ValueError(f"parameters without sharded metadata: {missing}")
    return specs
