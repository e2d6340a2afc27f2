"""Which checkpoints a level directory holds, and in which state."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from checkpointing.base.durable import TRACKER_NAME, read_tracker
from checkpointing.format.metadata import ITER_DIR, METADATA_NAME


def iteration_dir(root: str, iteration: int) -> str:
    """Megatron-LM's directory name: ``iter_0000010``."""
    return os.path.join(root, f"iter_{iteration:07d}")


@dataclass(frozen=True)
class StoredCheckpoint:
    iteration: int
    path: str
    committed: bool
    """The global metadata exists: every rank's files were durable before it was written."""

    def size_bytes(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.path) if e.is_file())


def list_checkpoints(root: str) -> list[StoredCheckpoint]:
    """Every ``iter_NNNNNNN`` directory of ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.scandir(root):
        match = ITER_DIR.match(entry.name)
        if match and entry.is_dir():
            committed = os.path.isfile(os.path.join(entry.path, METADATA_NAME))
            found.append(StoredCheckpoint(int(match.group(1)), entry.path, committed))
    return sorted(found, key=lambda c: c.iteration)


def load_candidates(root: str, step: int | None = None) -> tuple[list[StoredCheckpoint], list[str]]:
    """Committed checkpoints to try, newest first, and notes on what was passed over.

    Without ``step``: those at or below the tracker (all, if there is no tracker). With
    ``step``: that one only (an empty list if it is not committed).
    """
    notes = []
    stored = list_checkpoints(root)
    for c in stored:
        if not c.committed:
            notes.append(f"{c.path} has no committed metadata (an interrupted save); not loaded")
    committed = [c for c in stored if c.committed]
    if step is not None:
        return [c for c in committed if c.iteration == step], notes
    try:
        tracker = read_tracker(root)
    except (ValueError, OSError) as error:  # edited or damaged by something else: a hint lost, not a stop
        notes.append(f"WARNING: the tracker of {root} is damaged ({error}); every committed checkpoint is a "
                     "candidate, newest first")
        tracker = None
    if tracker is not None:
        for c in committed:
            if c.iteration > tracker:
                notes.append(f"{c.path} is newer than the tracker ({tracker}); not loaded")
        committed = [c for c in committed if c.iteration <= tracker]
    return committed[::-1], notes


MEGATRON_METADATA_JSON = "metadata.json"
"""What megatron-core's ``dist_checkpointing`` writes beside a checkpoint's DCP files."""


def is_megatron_torch_dist(directory: str) -> bool:
    """True if ``directory`` holds megatron-core's ``metadata.json`` of a torch_dist checkpoint."""
    try:
        with open(os.path.join(directory, MEGATRON_METADATA_JSON)) as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False


def megatron_checkpoint_in(root: str) -> str | None:
    """The Megatron-LM torch_dist checkpoint ``root`` is or holds (its tracker's ``iter_N`` or
    ``release``), or None: our loader cannot read one (``convert_checkpoint.py --from megatron``
    can), and it should say so rather than call its files damaged."""
    candidates = [root]
    try:
        with open(os.path.join(root, TRACKER_NAME)) as f:
            text = f.read().strip()
        candidates.append(os.path.join(root, "release" if text == "release" else f"iter_{int(text):07d}"))
    except (OSError, ValueError):
        pass
    return next((path for path in candidates if is_megatron_torch_dist(path)), None)
