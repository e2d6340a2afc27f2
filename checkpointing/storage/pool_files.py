"""The names of the L0 pool's files: which job's slots are where (``host_pool`` makes and maps them).

Apart from ``host_pool`` because it imports no torch: ``rollback.sh`` finds a job's slots
with it, and reads a slot's description (torch) only where there is one.
"""

from __future__ import annotations

import glob
import hashlib
import os

from checkpointing.base import levels, private_files

SHM_DIR = levels.SHM_DIR
PREFIX = "gptckpt-"
"""Every slot's file name starts with it, then the job's tag (:func:`job_tag`)."""


def job_tag(save_dir: str) -> str:
    """A short, stable name for a job: its ``--save`` directory."""
    return hashlib.sha1(os.path.abspath(save_dir).encode()).hexdigest()[:12]


def list_segments(tag: str | None = None, directory: str = SHM_DIR) -> list[str]:
    """Slots, their descriptions, and temporary files a killed description write left, in this
    user's pool directories under ``directory``."""
    pattern = f"{PREFIX}{tag or ''}*"
    found = []
    for own in private_files.own_pool_dirs(directory):
        found += glob.glob(os.path.join(own, pattern)) + glob.glob(os.path.join(own, f".{pattern}.tmp.*"))
    return sorted(found)
