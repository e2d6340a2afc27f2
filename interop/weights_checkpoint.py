"""Write model weights as one of our checkpoints: iteration 0, weights only (no optimizer state,
no RNG states), committed by the same protocol as training's saves, so ``--load`` (with
``--finetune`` or ``--no-load-optim``) reads it into any layout.

One process writes it as a 1-process gloo job: the layout it records is TP1 x PP1 x DP1, and
every tensor is one chunk of its global tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from checkpointing.base import sync_level
from checkpointing.format import SaveResult, TensorPiece, keys, save_and_commit


@contextlib.contextmanager
def _one_process_group() -> Iterator[Any]:
    """A 1-process gloo group (this one if the process already is a 1-process job)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("writing a weights-only checkpoint needs a 1-process job, "
                               f"this one has {dist.get_world_size()} processes")
        yield dist.group.WORLD
        return
    # A HashStore: no port to find, nothing outside the process.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def weights_only_layout(num_layers: int, dtype: torch.dtype) -> dict[str, Any]:
    """The layout such a checkpoint records (the trainer's ``layout`` keys)."""
    return {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1, "distributed_optimizer": False,
            "num_layers": num_layers, "bf16": dtype == torch.bfloat16}


def weights_only_common(model_args: dict, layout: dict, extra_args: dict, source: str) -> dict[str, Any]:
    """The ``common`` object: what the trainer's ``after_load`` reads (iteration, optimizer step,
    skipped steps, layout, device, ``args.model``), at iteration 0."""
    return {
        "iteration": 0,
        "consumed_samples": 0,
        "optimizer_step": 0,
        "skipped_steps": 0,
        "layout": layout,
        "device": "cpu",
        "args": {"model": dict(model_args), **extra_args},
        "imported_from": source,
    }


def write_weights_checkpoint(out_dir: str, tensors: dict[str, torch.Tensor], common: dict[str, Any],
                             layout: dict[str, Any]) -> SaveResult:
    """Commit ``tensors`` (global name -> whole tensor) as ``out_dir/iter_0000000`` and move the
    tracker to 0."""
    arrays = {name: t.detach().contiguous().reshape(-1) for name, t in tensors.items()}
    pieces = [TensorPiece(key=name, array=name, start=0, shape=tuple(t.shape), global_shape=tuple(t.shape),
                          global_offset=(0,) * t.dim()) for name, t in tensors.items()]
    with _one_process_group() as group:
        return save_and_commit(sync_level(out_dir), 0, arrays, pieces, {keys.COMMON: common}, layout, group)
