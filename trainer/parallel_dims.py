"""The parallel layout (tensor x pipeline x data) as one validated object.

Validation happens at construction, before any process group exists, so an impossible layout is
refused before heavy work. :meth:`ParallelDims.initialize` then builds megatron-core's process
groups, whose rank order (TP fastest, then DP, then PP) this object mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from cli.flags import flag


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor, pipeline and data parallelism of a job."""

    world_size: int
    """Number of processes in the job."""
    tensor_parallel: int = flag("--tensor-model-parallel-size", 1)
    """Tensor-parallel degree: each layer's weights split over this many ranks."""
    pipeline_parallel: int = flag("--pipeline-model-parallel-size", 1)
    """Pipeline-parallel degree: the layers cut into this many stages."""
    sequence_parallel: bool = flag("--sequence-parallel", False)
    """Megatron's sequence parallelism: the activations outside the tensor-parallel regions (norms,
    dropout, residual adds) are cut along the sequence over the TP ranks instead of repeated on each,
    dividing their memory by the TP degree; needs ``--tensor-model-parallel-size`` > 1."""

    def __post_init__(self) -> None:
        for name, value in (
            ("world size", self.world_size),
            ("--tensor-model-parallel-size", self.tensor_parallel),
            ("--pipeline-model-parallel-size", self.pipeline_parallel),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it cuts the sequence over "
                             "the tensor-parallel ranks)")
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if self.world_size % model_parallel:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor x pipeline parallel "
                f"size {self.tensor_parallel} x {self.pipeline_parallel} = {model_parallel}; "
                f"launch a multiple of {model_parallel} processes (torchrun --nproc-per-node)"
            )

    @property
    def data_parallel(self) -> int:
        """Data-parallel degree: world / (TP x PP)."""
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    def describe(self) -> str:
        return (
            f"TP{self.tensor_parallel} x PP{self.pipeline_parallel} x DP{self.data_parallel} "
            f"({self.world_size} processes)"
        )

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank in megatron-core's default order."""
        tp = rank % self.tensor_parallel
        dp = (rank // self.tensor_parallel) % self.data_parallel
        pp = rank // (self.tensor_parallel * self.data_parallel)
        return tp, dp, pp

    def initialize(self) -> "ParallelGroups":
        """Create megatron-core's process groups; ``torch.distributed`` must be initialised."""
        from megatron.core import parallel_state

        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"ParallelDims was built for {self.world_size} processes but torch.distributed "
                f"has {dist.get_world_size()}"
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tensor_parallel,
            pipeline_model_parallel_size=self.pipeline_parallel,
        )
        groups = ParallelGroups(dims=self, rank=dist.get_rank())
        expected = self.coordinates(groups.rank)
        if (groups.tp_rank, groups.dp_rank, groups.pp_rank) != expected:
            raise RuntimeError(
                f"megatron-core's rank order differs from the one ParallelDims assumes on rank "
                f"{groups.rank}: {(groups.tp_rank, groups.dp_rank, groups.pp_rank)} != {expected}"
            )
        return groups


class ParallelGroups:
    """This rank's coordinates and process groups, read once from megatron-core."""

    def __init__(self, dims: ParallelDims, rank: int):
        from megatron.core import parallel_state as ps

        self.dims = dims
        self.rank = rank
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.model_parallel_group = ps.get_model_parallel_group()
        # The tied word embeddings live on the first and last stage; middle stages have no group.
        self.embedding_group = (
            ps.get_embedding_group()
            if dims.pipeline_parallel > 1 and self.pp_rank in (0, dims.pipeline_parallel - 1)
            else None
        )
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group)
        self.dp_ranks = dist.get_process_group_ranks(self.dp_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pipeline_parallel - 1

    @property
    def prev_stage_rank(self) -> int:
        return self.pp_ranks[self.pp_rank - 1]

    @property
    def next_stage_rank(self) -> int:
        return self.pp_ranks[self.pp_rank + 1]

    @property
    def is_logging_rank(self) -> bool:
        """The last rank logs, as in Megatron-LM: it is on the last stage and has the loss."""
        return self.rank == self.dims.world_size - 1

    @staticmethod
    def destroy() -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
