"""Which ranks see the same directory: how node-local (L1) and shared (L2) levels are told apart.

A path string says nothing about where it lives: ``/local/ckpt`` is a different disk on every
node, and two launchers on one machine (the two-node test) can point at different directories.
So the ranks ask the file system: each creates a probe file named after itself, and after a
barrier each lists the probes it sees. Ranks that see each other's probes share the directory;
the lowest of them coordinates it (moves an old ``iter_N`` aside, writes the metadata, the
tracker and retention).
"""

from __future__ import annotations

import os
import uuid

from checkpointing.base.agreement import gather_from_all

PROBE_PREFIX = ".peer-probe-"


def directory_peers(directory: str, group) -> list[int]:
    """The ranks of ``group`` (this one included) whose ``directory`` is the same directory.

    Collective over ``group``. ``directory`` must exist and be writable (the start-up probe
    checks it first)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    token = gather_from_all(group, uuid.uuid4().hex[:12])[0]  # one name for this probe round
    mine = os.path.join(directory, f"{PROBE_PREFIX}{token}-{rank}")
    with open(mine, "wb"):
        pass
    gather_from_all(group, None)  # every probe exists before anyone looks
    prefix = f"{PROBE_PREFIX}{token}-"
    seen = sorted(int(name[len(prefix):]) for name in os.listdir(directory) if name.startswith(prefix))
    gather_from_all(group, None)  # everyone has looked before the probes go
    os.unlink(mine)
    return seen
