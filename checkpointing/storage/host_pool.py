"""L0: a pool of host-memory slots backed by shared memory, each holding one version.

Every slot holds one copy of each flat array, laid out back to back in one file in this user's
directory under ``/dev/shm`` (``/dev/shm/gptckpt-<uid>/``, mode 0700; files 0600, named after
the job and rank), mapped shared so that a flusher could read it and the last snapshot outlives
a killed trainer. Slots are allocated and touched once at start: first touch of fresh pages is
several times slower than a copy into touched ones. The next run of the same job reuses the same
names, after checking that the directory and every file are this user's alone
(``checkpointing.base.private_files``); ``python -m checkpointing.storage.host_pool --list/--remove`` shows
and removes them.

A slot's description (``<slot>.meta``: version, small state, layout) is the L0 commit. It is
a ``torch.save`` blob read back with ``weights_only`` (``checkpointing.base.safe_pickle``): reading
it cannot run code, whoever wrote it.
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass

import torch

from checkpointing.base import private_files
from checkpointing.base.config import CheckpointConfig
from checkpointing.base.durable import atomic_write_bytes
from checkpointing.base.errors import CheckpointError
from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.base.safe_pickle import load_objects
from checkpointing.format.items import TensorPiece
from checkpointing.format.writer import EncodedItem
from checkpointing.storage.description_file import (  # noqa: F401 (OBJECT_BLOBS: host_pool's name too)
    OBJECT_BLOBS,
    checked_slot_description,
    framed_description,
    read_verified,
)
from checkpointing.storage.pool_files import PREFIX, SHM_DIR, job_tag, list_segments  # noqa: F401 (host_pool's names too)
from cli.flags import add_flag

ALIGN = 4096

@dataclass(frozen=True)
class ArraySpec:
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def slot_bytes(specs: dict[str, ArraySpec]) -> int:
    return sum(-(-s.nbytes // ALIGN) * ALIGN for s in specs.values())


def read_description(meta_path: str, decode_objects: bool = True) -> dict | None:
    """A slot's description (``version``, ``objects``: the small state, ``layout``), or None if
    there is none. ``decode_objects`` False: a flusher's small state is left as its byte items
    (:data:`OBJECT_BLOBS`), not decoded into ``objects``: what lists versions needs none of it.

    Raises :class:`private_files.UnsafePathError` if the file is not this user's alone (not
    read) and :class:`CheckpointError` if it is damaged or would need code to be read."""
    blob = read_verified(meta_path)
    if blob is None:
        return None
    description = checked_slot_description(load_objects(blob, f"L0 description {meta_path}")[0], meta_path)
    if OBJECT_BLOBS in description and decode_objects:
        description["objects"] = {name: load_objects(b, f"{name} of L0 description {meta_path}")[0]
                                  for name, b in description[OBJECT_BLOBS].items()}
    return description


def description_blob(version: int, small_state: dict, layout: ParallelLayout | dict, pieces=None,
                     specs: dict[str, ArraySpec] | None = None, **extra) -> bytes:
    """A slot's description as bytes (``torch.save`` of builtins only, read back with
    ``weights_only``). A ``small_state`` of :class:`EncodedItem` values (a flusher's) is kept as
    their bytes, under :data:`OBJECT_BLOBS`; :func:`read_description` decodes either kind.
    ``pieces`` and ``specs`` make the slot a self-describing checkpoint of its rank: which rectangle of which global tensor lies where (a resume from memory into
    another layout, ``checkpointing.recovery.memory_recovery``, reshards from them); ``extra``: a
    replica's source, holder and checksum (``checkpointing.storage.peer_replicas``). ``pieces``:
    the pieces, or :func:`encode_pieces` of them (a flusher describes the same pieces at every
    version: encoded once, they cost a copy of their bytes per version instead of ~4 ms of
    pickling hundreds of tuples through ``torch.save``)."""
    encoded = [isinstance(v, EncodedItem) for v in small_state.values()]
    if any(encoded) and not all(encoded):  # under "objects", an EncodedItem would not be read back
        raise ValueError(f"a slot's small state is encoded whole or not at all; these items are not: "
                         f"{sorted(n for n, e in zip(small_state, encoded) if not e)}")
    if small_state and all(encoded):
        objects = {OBJECT_BLOBS: {name: item.blob for name, item in small_state.items()}}
    else:
        objects = {"objects": small_state}
    description = {"version": version, **objects,
                   "layout": layout.to_dict() if isinstance(layout, ParallelLayout) else dict(layout)}
    if pieces is not None:
        description["pieces"] = pieces if isinstance(pieces, bytes) else encode_pieces(pieces)
    if specs is not None:
        description["arrays"] = encode_specs(specs)
    description.update(extra)
    blob = io.BytesIO()
    torch.save(description, blob)
    return blob.getvalue()


def write_description(meta_path: str, version: int, small_state: dict, layout: ParallelLayout, pieces=None,
                      specs: dict[str, ArraySpec] | None = None) -> None:
    """The L0 commit of a slot: what it holds, written atomically (by the flusher process). The
    small state is stored under ``objects``, the key every description has had."""
    atomic_write_bytes(meta_path, framed_description(description_blob(version, small_state, layout, pieces, specs)),
                       mode=0o600)


def encode_pieces(pieces) -> bytes:
    """A description's ``pieces``: ``torch.save`` of each piece's fields (builtins only)."""
    blob = io.BytesIO()
    torch.save([encode_piece(p) for p in pieces], blob)
    return blob.getvalue()


def decode_pieces(value, where: str) -> list[TensorPiece]:
    """The pieces of a description (:func:`encode_pieces`' bytes, or the list of fields that
    descriptions held before them). Raises :class:`CheckpointError` naming ``where``."""
    if isinstance(value, bytes):
        value, _ = load_objects(value, f"the pieces of {where}")
    try:
        return [decode_piece(p) for p in value]
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the pieces of {where} cannot be decoded ({error}); not recovered") from error


def encode_piece(piece: TensorPiece) -> tuple:
    return (piece.key, piece.array, piece.start, tuple(piece.shape), tuple(piece.global_shape),
            tuple(piece.global_offset), piece.is_writer)


def decode_piece(fields) -> TensorPiece:
    key, array, start, shape, global_shape, global_offset, is_writer = fields
    return TensorPiece(key, array, int(start), tuple(shape), tuple(global_shape), tuple(global_offset), bool(is_writer))


def encode_specs(specs: dict[str, ArraySpec]) -> list[tuple[str, int, str]]:
    return [(name, spec.numel, str(spec.dtype).removeprefix("torch.")) for name, spec in specs.items()]


def decode_specs(fields) -> dict[str, ArraySpec]:
    specs = {}
    for name, numel, dtype in fields:
        value = getattr(torch, str(dtype), None)
        if not isinstance(value, torch.dtype):
            raise CheckpointError(f"a slot description names an unknown dtype {dtype!r}")
        specs[str(name)] = ArraySpec(int(numel), value)
    return specs


def map_arrays(path: str, specs: dict[str, ArraySpec]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A slot's file mapped shared, and its arrays as views of it (no copy, no touch)."""
    memory = torch.from_file(path, shared=True, size=slot_bytes(specs), dtype=torch.uint8)
    arrays, offset = {}, 0
    for name, spec in specs.items():
        arrays[name] = memory[offset : offset + spec.nbytes].view(spec.dtype)
        offset += -(-spec.nbytes // ALIGN) * ALIGN
    return memory, arrays


class HostSlot:
    """One version's worth of host memory."""

    def __init__(self, path: str, specs: dict[str, ArraySpec], notes: list[str] | None = None):
        """``notes``: where to say what was refused (files another user planted, ...)."""
        self.path = path
        self.meta_path = path + ".meta"
        self.notes = notes if notes is not None else []
        size = slot_bytes(specs)
        self.version: int | None = None
        self.small_state: dict | None = None
        """The small state of the version the slot holds, once described (None: not committed)."""
        self.layout: ParallelLayout | None = None
        """The layout of the state whose version the slot holds (None: none, or unrecorded)."""
        for file in (path, self.meta_path):
            why = private_files.problem(file) if os.path.lexists(file) else None
            if why is not None:
                aside = private_files.set_aside(file)
                self.notes.append(f"WARNING: L0 {file} refused: {why}; moved to {aside}, not read")
        if not os.path.exists(path):
            os.close(private_files.create_new(path, 0o600))
        survived = None
        if os.path.getsize(path) == size:
            survived = self._read_description()
        else:
            os.truncate(path, size)
        self.memory, self.arrays = map_arrays(path, specs)
        if survived is None:
            self.invalidate()
            self.memory.fill_(0)  # touch every page once, now, not during the first copy
        else:  # a previous run's snapshot (e.g. the trainer was killed): keep it for recovery
            self.version, self.small_state = survived["version"], survived["objects"]
            self.layout = ParallelLayout.from_dict(survived["layout"])

    def _read_description(self) -> dict | None:
        try:
            return read_description(self.meta_path)
        except (CheckpointError, private_files.UnsafePathError) as error:
            # Never half-written (atomic rename): damaged or planted. Not used, not run.
            self.notes.append(f"WARNING: L0 snapshot {self.path} not recovered: {error}")
            return None

    def described_at(self) -> float:
        """When the slot's description was written (0.0: none)."""
        try:
            return os.stat(self.meta_path).st_mtime
        except OSError:
            return 0.0

    def invalidate(self) -> None:
        """Forget what the slot holds, in memory and on disk."""
        self.version = self.small_state = self.layout = None
        self.remove_description()

    def remove_description(self) -> None:
        """Before the first byte is overwritten: a crash mid-copy must not leave the old
        description pointing here (one unlink on the training thread, at the step or request
        that overwrites the slot)."""
        try:
            os.unlink(self.meta_path)
        except FileNotFoundError:
            pass

    def describe(self, version: int, small_state: dict, layout: ParallelLayout) -> None:
        """After the copy: record what the slot holds (the L0 commit), from this process."""
        self.version, self.small_state, self.layout = version, small_state, layout
        write_description(self.meta_path, version, small_state, layout)


REPLICA_SLOTS = 2
"""Replica slots per source rank: the newest complete replica stays whole while the next one is
received into the other slot."""


def lock_path(directory: str, tag: str, rank: int) -> str:
    """The rank's pool lock (``checkpointing.base.job_lock``), named like its slots: ``--list`` and the
    pool's removal see it."""
    return os.path.join(directory, f"{PREFIX}{tag}-r{rank}.lock")


def replica_slot_path(directory: str, tag: str, holder: int, source: int, index: int) -> str:
    """Where ``holder`` keeps replica slot ``index`` of ``source``'s versions."""
    return os.path.join(directory, f"{PREFIX}{tag}-r{holder}-p{source}-s{index}")


class HostPool:
    """``num_slots`` slots within ``budget_bytes`` (None: no budget), and the replica area: for
    each source rank of ``replica_specs``, :data:`REPLICA_SLOTS` slots of its arrays."""

    def __init__(self, tag: str, rank: int, specs: dict[str, ArraySpec], num_slots: int, budget_bytes: int | None,
                 directory: str = SHM_DIR, replica_specs: dict[int, dict[str, ArraySpec]] | None = None):
        """``directory``: a tmpfs (``/dev/shm``, per node); another one simulates a second node
        on one machine. ``replica_specs``: the arrays of each rank whose versions this one holds
        (``--ckpt-peer-replicas``); their memory counts against the budget first."""
        per_slot = slot_bytes(specs)
        replica_specs = dict(replica_specs or {})
        replica_bytes = sum(REPLICA_SLOTS * slot_bytes(s) for s in replica_specs.values())
        if budget_bytes is not None:
            fit = (budget_bytes - replica_bytes) // per_slot
            if fit < 1:
                replicas = (f" beside {replica_bytes / 2**30:.3f} GiB of peer replicas (--ckpt-peer-replicas)"
                            if replica_bytes else "")
                raise ValueError(
                    f"--ckpt-host-budget-gb {budget_bytes / 2**30:.3f} is less than one version of this "
                    f"rank's state ({per_slot / 2**30:.3f} GiB){replicas}; raise it")
            num_slots = min(num_slots, fit)
        self.tag = tag
        self.rank = rank
        self.bytes = per_slot * num_slots
        self.replica_bytes = replica_bytes
        """Host memory of the replica area (within the budget)."""
        self.directory, note = private_files.pool_dir(directory)
        self.notes: list[str] = [note] if note else []
        """What was refused while opening the pool (the engine logs them)."""
        self.specs = dict(specs)
        self.slots = [HostSlot(os.path.join(self.directory, f"{PREFIX}{tag}-r{rank}-s{i}"), specs, self.notes)
                      for i in range(num_slots)]
        self.replica_slots: dict[int, list[HostSlot]] = {
            source: [HostSlot(replica_slot_path(self.directory, tag, rank, source, i), source_specs, self.notes)
                     for i in range(REPLICA_SLOTS)]
            for source, source_specs in sorted(replica_specs.items())}
        """Each source rank's replica slots (their descriptions are ``checkpointing.storage.peer_replicas``')."""
        self.control_path = os.path.join(self.directory, f"{PREFIX}{tag}-r{rank}.ctl")
        self.lock_path = lock_path(self.directory, tag, rank)
        """This rank's lock on the pool, taken at start-up (``checkpointing.manager.claim_checkpoint_dirs``)."""
        """The words this rank's trainer and flusher share (``checkpointing.engine.control_block``)."""


@dataclass(frozen=True)
class PoolFiles:
    """An engine's L0 pool as the template sees it: every file, and the slot descriptions among them."""

    files: tuple[str, ...]
    descriptions: tuple[str, ...]
    """A slot holds a version once its description exists (``checkpointing.storage.host_pool``)."""

    def holds_no_version(self) -> bool:
        return not any(os.path.lexists(path) for path in self.descriptions)

    def remove(self) -> None:
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def pool_files(pool: HostPool) -> PoolFiles:
    """``pool``'s files, and the slot descriptions among them (a version is in the pool once one exists)."""
    slots = pool.slots + [s for held in pool.replica_slots.values() for s in held]
    return PoolFiles(tuple([p for slot in slots for p in (slot.path, slot.meta_path)] + [pool.control_path]),
                     tuple(slot.meta_path for slot in pool.slots))


def remove_pool(pool: HostPool) -> int:
    """Remove ``pool``'s files (slots, descriptions, the control block; the mapped memory goes with the last
    reference to it); returns the bytes freed."""
    freed = 0
    for path in pool_files(pool).files:
        try:
            freed += os.lstat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            pass
    return freed


def remove_segments(save_dir: str, directory: str = SHM_DIR) -> int:
    """Remove the pool of the job whose ``--save`` is ``save_dir``; returns the bytes freed."""
    freed = 0
    for path in list_segments(job_tag(save_dir), directory):
        freed += os.lstat(path).st_size
        os.unlink(path)
    return freed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="List or remove the shared-memory checkpoint pools of jobs.")
    add_flag(parser, CheckpointConfig, "save", help="only the pool of the job with this --save directory")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list them with their sizes (the default)")
    action.add_argument("--remove", action="store_true", help="remove them (a running job's pool too: stop it first)")
    add_flag(parser, CheckpointConfig, "host_dir")
    args = parser.parse_args(argv)
    tag = job_tag(args.save) if args.save else None
    usual = os.path.join(args.host_dir, f"{private_files.POOL_DIR_PREFIX}{os.getuid()}")
    why = private_files.problem(usual, directory=True, private=True) if os.path.lexists(usual) else None
    if why is not None:
        print(f"WARNING: {usual} refused: {why}; not listed, not removed")
    total = 0
    for path in list_segments(tag, args.host_dir):
        size = os.lstat(path).st_size
        total += size
        print(f"{path}\t{size / 2**20:.1f} MiB")
        if args.remove:
            os.unlink(path)
    print(f"{'removed' if args.remove else 'total'}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
