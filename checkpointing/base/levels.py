"""A storage level of the checkpoint (``docs/architecture.md``): where it is, how often, how many kept.

L0 is the host pool (``checkpointing.storage.host_pool``); the levels here are directories: L1
node-local, L2 the shared ``--save``; ``sync`` is the synchronous save to ``--save`` without the
engine. The commit protocol (``checkpointing.format.commit``) writes one version to one level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HOST_DIR_VARIABLE = "GPT_CKPT_HOST_DIR"
SHM_DIR = os.environ.get(HOST_DIR_VARIABLE) or "/dev/shm"
"""The default parent of the L0 pool (``--ckpt-host-dir``): ``/dev/shm``, or ``$GPT_CKPT_HOST_DIR``
where it is set, read once at import (the test suite gives each pytest worker a directory of its
own, so that one worker's clean-up never removes another's pools)."""
L0 = "L0"
"""The host pool: snapshots in shared memory (``checkpointing.storage.host_pool``)."""
L1 = "L1"
"""The node-local directory (``--ckpt-local-dir``)."""
L2 = "L2"
"""The shared, persistent directory (``--save``; ``--load`` is read as this level)."""
PEER = "peer"
"""L0 peer replicas: a version's L0 slot sent to partner ranks on other nodes
(``checkpointing.storage.peer_replicas``); flushed by the flusher as a level, without a directory."""
MEMORY = "memory"
"""A resume from host memory anywhere in the job: own L0 slots and peer replicas
(``checkpointing.recovery.memory_recovery``)."""
SYNC = "sync"
"""The synchronous save to ``--save`` without the engine (written by the training process)."""
DISK_LEVELS = (L1, L2)
"""The directory levels the engine flushes to, fastest first."""


@dataclass(frozen=True)
class Level:
    """A storage level written by the flusher process (or, for ``sync``, by the training process)."""

    name: str
    """:data:`L1`, :data:`L2` or :data:`SYNC` (names its fault points and trace spans)."""
    root: str
    interval: int | None
    """Flush every this many iterations; None: only forced flushes (end of training)."""
    retain_last: int | None
    peers: list[int] | None = None
    """Ranks that share this rank's ``root`` (``checkpointing.storage.peers``); None: every rank."""
    write_rate: float | None = None
    """Bytes per second this rank writes at most (``--ckpt-write-rate-limit``); None: no limit."""

    def is_due(self, version: int) -> bool:
        """Whether ``version`` is flushed to this level by its interval."""
        return bool(self.interval) and version % self.interval == 0


def sync_level(root: str, retain_last: int | None = None) -> Level:
    """The synchronous save to ``--save`` (no engine): written when asked, every rank shares it."""
    return Level(SYNC, root, None, retain_last)
