"""How the ranks of a job agree: every rank's small value, on every rank.

Checkpoint decisions (which version to load, whether a save failed anywhere, which ranks share
a directory) must come out the same on every rank, or ranks would load different versions or
hang in different collectives. Every such decision goes through :func:`gather_from_all` on the
checkpoint layer's own gloo group (CPU objects, never the training communicator).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_from_all(group, value):
    """Every rank's ``value`` (a small picklable object), in rank order, on every rank."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def any_rank(group, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank of ``group`` (one all-reduce of a flag; none in a
    group of one, which agrees with itself: a single-process job asks several times a version,
    and each gloo collective cost ~0.1-0.4 ms of the flusher's CPU)."""
    if dist.get_world_size(group) == 1:
        return flag
    raised = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(raised, op=dist.ReduceOp.MAX, group=group)
    return bool(raised.item())


def errors_from_all(group, error: str | None) -> list[str | None]:
    """Every rank's ``error`` (None: it had none), in rank order, on every rank; ``[]`` when no rank
    had one. The common case costs one all-reduce of a flag (:func:`any_rank`), where
    :func:`gather_from_all` pickles (a fifth of the CPU time); only when a rank failed are the
    messages gathered."""
    if not any_rank(group, error is not None):
        return []
    return [error] if dist.get_world_size(group) == 1 else gather_from_all(group, error)


def common_to_all(group, values) -> set:
    """The elements of ``values`` (a collection) that every rank holds."""
    return set.intersection(*[set(v) for v in gather_from_all(group, sorted(values))])
