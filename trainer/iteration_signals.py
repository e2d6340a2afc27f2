"""Flags every rank must learn at the same iteration, carried by reductions the step already makes.

A live rollback is asked for through a file only rank 0 looks at, and a loss spike is seen on the
last pipeline stage only; every rank must act on either at the same iteration boundary, or the
ranks would wait in different collectives. A collective per iteration just to ask would cost
every iteration something, so the flags ride on the step's own reductions (as megatron-core
folds its found-inf check into the gradient norm's):

- over data-parallel ranks, as extra elements of the gradient buffer's all-reduce (replicated
  optimizer, or gloo) or of the gradient norm's data-parallel all-reduce (distributed optimizer);
- over tensor and pipeline ranks, as extra elements of the gradient norm's model-parallel
  all-reduce.

A rank raises a flag by setting its element before the gradient reduction; after the step every
rank reads a sum, the same on every rank, and a flag is raised when it is above zero (a flag
raised by several ranks, or counted by two reductions, is still just raised).
"""

from __future__ import annotations

ROLLBACK_REQUESTED = 0
"""Rank 0 found a valid live-rollback request file (``checkpointing.recovery.rollback_request``)."""
LOSS_SPIKE = 1
"""The last pipeline stage saw a loss spike or a non-finite loss (``trainer.live_rollback``)."""
COUNT = 2
"""Elements carried after the gradients and beside the gradient norm."""
