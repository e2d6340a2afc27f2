"""How the ranks of a job agree: every rank's small value, on every rank.

Checkpoint decisions (which version to load, whether a save failed anywhere, which ranks share
a directory) must come out the same on every rank, or ranks would load different versions or
hang in different collectives. Every such decision goes through :func:`gather_from_all` on the
checkpoint layer's own gloo group (CPU objects, never the training communicator).
"""

from __future__ import annotations

import torch.distributed as dist


def gather_from_all(group, value):
    """Every rank's ``value`` (a small picklable object), in rank order, on every rank."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def common_to_all(group, values) -> set:
    """The elements of ``values`` (a collection) that every rank holds."""
    return set.intersection(*[set(v) for v in gather_from_all(group, sorted(values))])
