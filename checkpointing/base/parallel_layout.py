"""The parallel layout a state was saved in: what decides which bytes each rank holds.

A checkpoint records it three times, always as a plain dict (the on-disk form, unchanged since
format 1): in its metadata (``Metadata.gpt_ckpt["layout"]``), in the small state
(``common["layout"]``) and in each L0 slot's description. A rank's own bytes (an L0 snapshot, a
node-local file) restore only into the layout that saved them; the shared level reshards into
any.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ParallelLayout:
    """How a job's training state is split over its ranks."""

    tensor_parallel: int
    """Tensor-parallel degree (``--tensor-model-parallel-size``)."""
    pipeline_parallel: int
    """Pipeline-parallel degree (``--pipeline-model-parallel-size``)."""
    data_parallel: int
    """Data-parallel degree (the processes over TP x PP)."""
    distributed_optimizer: bool
    """The optimizer state is sharded over the data-parallel ranks (``--use-distributed-optimizer``)."""
    num_layers: int
    """Transformer layers (their split over pipeline stages decides which rank holds which)."""
    bf16: bool
    """The model's weights are bf16 (their cast copy is saved beside the fp32 main weights)."""

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form: a dict of builtins, keys in field order (as every format wrote it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any] | None) -> ParallelLayout | None:
        """The layout a checkpoint recorded, or None where it recorded none, or other fields
        (such a layout matches none of this version's)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(saved, Mapping) or set(saved) != set(names):
            return None
        return cls(**{name: saved[name] for name in names})

    def describe(self) -> str:
        """``TP2xDP2``, ``TP2xPP2xDP1``: the degrees (a pipeline degree of 1 left out)."""
        pp = f"xPP{self.pipeline_parallel}" if self.pipeline_parallel != 1 else ""
        return f"TP{self.tensor_parallel}{pp}xDP{self.data_parallel}"

    def how_saved(self, current: ParallelLayout) -> str:
        """What differs from ``current``, as in "was saved at TP2xDP2 (this run: TP1xDP1)"."""
        if self.describe() != current.describe():
            return f"saved at {self.describe()} (this run: {current.describe()})"
        if self.distributed_optimizer != current.distributed_optimizer:
            return (f"saved {'with' if self.distributed_optimizer else 'without'} the distributed optimizer "
                    f"(this run: {'with' if current.distributed_optimizer else 'without'})")
        if self.num_layers != current.num_layers:
            return f"saved with {self.num_layers} layers (this model: {current.num_layers})"
        if self.bf16 != current.bf16:
            return f"saved in {'bf16' if self.bf16 else 'fp32'} (this run: {'bf16' if current.bf16 else 'fp32'})"
        return f"saved at {self.describe()}, as this run"


def how_saved(saved: ParallelLayout | None, current: ParallelLayout) -> str:
    """:meth:`ParallelLayout.how_saved`, also for a checkpoint that recorded no layout of this
    version's fields."""
    return saved.how_saved(current) if saved is not None else "saved in a layout this version does not record"
