"""L0: a pool of host-memory slots backed by shared memory, each holding one version.

Every slot holds one copy of each flat array, laid out back to back in one file under
``/dev/shm`` (named after the job and rank), mapped shared so that a flusher could read it and
the last snapshot outlives a killed trainer. Slots are allocated and touched once at start:
first touch of fresh pages is several times slower than a copy into touched ones. The next run
of the same job reuses the same names; ``python -m checkpointing.host_pool --list/--remove``
shows and removes them.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import pickle
from dataclasses import dataclass

import torch

from checkpointing.durable import atomic_write_bytes

SHM_DIR = "/dev/shm"
PREFIX = "gptckpt-"
ALIGN = 4096


def job_tag(save_dir: str) -> str:
    """A short, stable name for a job: its ``--save`` directory."""
    return hashlib.sha1(os.path.abspath(save_dir).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ArraySpec:
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def slot_bytes(specs: dict[str, ArraySpec]) -> int:
    return sum(-(-s.nbytes // ALIGN) * ALIGN for s in specs.values())


class HostSlot:
    """One version's worth of host memory."""

    def __init__(self, path: str, specs: dict[str, ArraySpec]):
        self.path = path
        self.meta_path = path + ".meta"
        size = slot_bytes(specs)
        self.version: int | None = None
        self.objects: dict | None = None
        self.layout: dict | None = None
        survived = self._read_description() if os.path.exists(path) and os.path.getsize(path) == size else None
        self.memory = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        if survived is None:
            self.invalidate()
            self.memory.fill_(0)  # touch every page once, now, not during the first copy
        else:  # a previous run's snapshot (e.g. the trainer was killed): keep it for recovery
            self.version, self.objects, self.layout = survived["version"], survived["objects"], survived["layout"]
        self.arrays: dict[str, torch.Tensor] = {}
        offset = 0
        for name, spec in specs.items():
            self.arrays[name] = self.memory[offset : offset + spec.nbytes].view(spec.dtype)
            offset += -(-spec.nbytes // ALIGN) * ALIGN
        self.pins = 0
        """Flush jobs not finished that read this slot; a pinned slot is never reused."""

    def _read_description(self) -> dict | None:
        try:
            with open(self.meta_path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            return None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            return None  # never half-written (atomic rename), so damaged by something else: ignore

    def invalidate(self) -> None:
        """Forget what the slot holds, in memory and on disk."""
        self.version = self.objects = self.layout = None
        self.remove_description()

    def remove_description(self) -> None:
        """Before the first byte is overwritten: a crash mid-copy must not leave the old
        description pointing here. (The copy thread calls it, so that the unlink is not on the
        training thread; until then the slot still holds what the description says.)"""
        try:
            os.unlink(self.meta_path)
        except FileNotFoundError:
            pass

    def describe(self, version: int, objects: dict, layout: dict) -> None:
        """After the copy: record what the slot holds (the L0 commit)."""
        self.version, self.objects, self.layout = version, objects, layout
        atomic_write_bytes(self.meta_path, pickle.dumps({"version": version, "objects": objects, "layout": layout}))


class HostPool:
    """``num_slots`` slots within ``budget_bytes`` (None: no budget)."""

    def __init__(self, tag: str, rank: int, specs: dict[str, ArraySpec], num_slots: int, budget_bytes: int | None,
                 directory: str = SHM_DIR):
        """``directory``: a tmpfs (``/dev/shm``, per node); another one simulates a second node
        on one machine."""
        per_slot = slot_bytes(specs)
        if budget_bytes is not None:
            fit = budget_bytes // per_slot
            if fit < 1:
                raise ValueError(
                    f"--ckpt-host-budget-gb {budget_bytes / 2**30:.3f} is less than one version of this "
                    f"rank's state ({per_slot / 2**30:.3f} GiB); raise it")
            num_slots = min(num_slots, fit)
        self.tag = tag
        self.bytes = per_slot * num_slots
        os.makedirs(directory, exist_ok=True)
        self.slots = [HostSlot(os.path.join(directory, f"{PREFIX}{tag}-r{rank}-s{i}"), specs) for i in range(num_slots)]


def list_segments(tag: str | None = None, directory: str = SHM_DIR) -> list[str]:
    """Slots, their descriptions, and temporary files a killed description write left."""
    pattern = f"{PREFIX}{tag or ''}*"
    return sorted(glob.glob(os.path.join(directory, pattern)) + glob.glob(os.path.join(directory, f".{pattern}.tmp.*")))


def remove_segments(save_dir: str, directory: str = SHM_DIR) -> int:
    """Remove the pool of the job whose ``--save`` is ``save_dir``; returns the bytes freed."""
    freed = 0
    for path in list_segments(job_tag(save_dir), directory):
        freed += os.path.getsize(path)
        os.unlink(path)
    return freed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="List or remove the shared-memory checkpoint pools of jobs.")
    parser.add_argument("--save", help="only the pool of the job with this --save directory")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list them with their sizes (the default)")
    action.add_argument("--remove", action="store_true", help="remove them (a running job's pool too: stop it first)")
    parser.add_argument("--ckpt-host-dir", default=SHM_DIR, help=f"where the pools are (default {SHM_DIR})")
    args = parser.parse_args(argv)
    tag = job_tag(args.save) if args.save else None
    total = 0
    for path in list_segments(tag, args.ckpt_host_dir):
        size = os.path.getsize(path)
        total += size
        print(f"{path}\t{size / 2**20:.1f} MiB")
        if args.remove:
            os.unlink(path)
    print(f"{'removed' if args.remove else 'total'}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
