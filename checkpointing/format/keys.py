"""Names of the items in a checkpoint, in one place (the writer, the loaders and the trainer's
state agree on them; stock ``torch.distributed.checkpoint`` readers see the same names).

- ``common``: the item of the small state every rank shares (iteration, optimizer step, layout,
  device, the run's arguments); captured by rank 0.
- ``rng_state.rank_<r>``: rank r's RNG states (one per rank: they differ across TP and PP).
- ``optimizer.state.<array>.<param>``: the optimizer's fp32 main weights and Adam moments, as
  global tensors of each parameter.
- ``<param>``: a model weight under its layout-independent name.
"""

from __future__ import annotations

COMMON = "common"
RNG_PREFIX = "rng_state."
OPTIMIZER_PREFIX = "optimizer."
OPTIMIZER_STATE_PREFIX = OPTIMIZER_PREFIX + "state."


def rng_key(rank: int) -> str:
    """The item holding global rank ``rank``'s RNG states."""
    return f"{RNG_PREFIX}rank_{rank}"


def optimizer_key(array: str, param: str) -> str:
    """The global tensor of optimizer array ``array`` (``fp32_param``, ``exp_avg``, ...) for ``param``."""
    return f"{OPTIMIZER_STATE_PREFIX}{array}.{param}"


def is_optimizer_key(key: str) -> bool:
    return key.startswith(OPTIMIZER_PREFIX)


def is_rng_key(key: str) -> bool:
    return key.startswith(RNG_PREFIX)
