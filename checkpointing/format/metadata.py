"""The global metadata: a stock DCP ``Metadata`` plus this project's facts in one attribute.

``state_dict_metadata``, ``storage_data`` and ``planner_data`` are what DCP's own writer
produces, so ``FileSystemReader`` and ``dcp_to_torch_save`` read a checkpoint without this
project. Our facts (format version, iteration, saving layout, one checksum per chunk) ride along
as ``Metadata.gpt_ckpt``, a dict of builtins: pickle restores it, stock readers ignore it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.metadata import Metadata

from checkpointing.base.durable import atomic_write_bytes
from checkpointing.base.errors import CheckpointCorruptError, CheckpointUntrustedError
from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.base.safe_pickle import check_pickle_bounds, load_dcp_metadata
from checkpointing.format.rectangles import TilingError, check_tiling

METADATA_NAME = ".metadata"
METADATA_CHECKSUM_NAME = ".metadata.xxh3"
"""``xxh3-64 <hex digest> <length>`` of ``.metadata``'s bytes, written before ``.metadata`` is
renamed into place and checked before it is unpickled: a flipped byte is damage, never a decoded
object. Stock DCP readers ignore the file."""
_CHECKSUM_LINE = re.compile(rb"xxh3-64 ([0-9a-f]{16}) ([0-9]{1,15})\n")
_CHECKSUM_LINE_MAX = 64
ITER_DIR = re.compile(r"^iter_(\d{7})$")
"""Megatron-LM's name of a checkpoint directory, ``iter_0000010``: the metadata's iteration must agree."""
FORMAT_VERSION = 2
"""2: tensors with a padded vocabulary dimension (embedding, output layer) are stored with the
true vocabulary's rows; 1: with Megatron's padding of the saving layout (still read)."""
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class ChunkRecord:
    """Where one chunk went; gathered to the coordinator to build the global metadata."""

    key: str
    offsets: tuple[int, ...] | None
    """Rectangle start in the global tensor; None for a byte item."""
    sizes: tuple[int, ...] | None
    global_shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    relative_path: str
    offset: int
    length: int
    checksum: int
    rank: int
    is_writer: bool = True
    """False for a replica: a piece another rank also holds, written only on node-local levels so
    that each node can restore its own ranks without the others (see ``build_metadata``)."""


def _check_tiling(key: str, global_shape: tuple[int, ...], chunks: list[ChunkRecord], complete: bool) -> None:
    """The chunks of ``key`` tile it exactly once (:func:`checkpointing.format.rectangles.check_tiling`);
    ``complete`` False: they overlap nowhere (one node's part of it)."""
    check_tiling(key, global_shape, [c.offsets for c in chunks], [c.sizes for c in chunks], [c.rank for c in chunks],
                 complete)


def build_metadata(records: list[ChunkRecord], iteration: int, layout: ParallelLayout | dict[str, Any],
                   local_files: list[str] | None = None) -> Metadata:
    """DCP metadata of every chunk of ``records``; checks that chunks tile each tensor once.

    Replica records (``is_writer`` False, written on node-local levels) stay out of the DCP
    view, which must tile each tensor once; they are listed in ``gpt_ckpt["replicas"]`` by
    (file, key, offsets). ``local_files``: on a node-local level, the data files this node holds;
    ``records`` are then that node's ranks' only (``checkpointing.format.commit``: each node's coordinator
    gathers its own ranks), the DCP view is the node's part of each tensor, and the tiling check
    refuses overlaps but not gaps (the other nodes' parts; the shared level checks the whole).
    """
    by_key: dict[str, list[ChunkRecord]] = defaultdict(list)
    replicas: dict[tuple[str, str, tuple[int, ...]], tuple[int, int]] = {}
    for r in records:
        if r.is_writer:
            by_key[r.key].append(r)
        else:
            replicas[(r.relative_path, r.key, tuple(r.offsets))] = (r.offset, r.length)
    state_dict_metadata: dict[str, Any] = {}
    # torch and DCP's classes, imported here: importing torch.distributed.checkpoint is slow, and
    # the flusher process would pay it at every start; only a commit needs them (and the command
    # line tools that read metadata inert need no torch at all).
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    storage_data: dict = {}
    checksums: dict[tuple[str, int], int] = {}
    for key, chunks in sorted(by_key.items()):
        first = chunks[0]
        if first.offsets is None:
            if len(chunks) != 1:
                raise TilingError(f"byte item {key} written by ranks {[c.rank for c in chunks]}")
            state_dict_metadata[key] = BytesStorageMetadata()
            storage_data[MetadataIndex(key)] = _StorageInfo(first.relative_path, first.offset, first.length)
        else:
            _check_tiling(key, first.global_shape, chunks, complete=local_files is None)
            state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=first.dtype),
                size=torch.Size(first.global_shape),
                chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in chunks],
            )
            for c in chunks:
                storage_data[MetadataIndex(key, c.offsets)] = _StorageInfo(c.relative_path, c.offset, c.length)
    metadata = Metadata(
        state_dict_metadata=state_dict_metadata,
        planner_data={key: (key,) for key in state_dict_metadata},
        storage_data=storage_data,
    )
    blobs = {(r.relative_path, r.offset): r for r in records}  # pieces over the same bytes share a blob
    for (path, offset), r in blobs.items():
        checksums[(path, offset)] = r.checksum
    metadata.gpt_ckpt = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        # The on-disk form; a dict is that form already (interop's weights-only writer builds one).
        "layout": layout.to_dict() if isinstance(layout, ParallelLayout) else dict(layout),
        "checksums": checksums,
        "total_bytes": sum(r.length for r in blobs.values()),
        "replicas": replicas,
        "local_files": sorted(local_files) if local_files is not None else None,
    }
    return metadata


def encode_metadata(metadata: Metadata) -> bytes:
    """``.metadata``'s bytes: the pickle DCP's own writer makes. (A level's later versions are
    pickled from parts instead: ``checkpointing.format.metadata_encoding``.)"""
    return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)


def write_metadata(directory: str, metadata: Metadata | bytes) -> None:
    """The commit point: temporary name, fsync, rename, fsync of the directory. The checksum of
    its bytes goes first (``METADATA_CHECKSUM_NAME``), so a committed ``.metadata`` always has one.
    ``metadata``: the object, or its bytes already encoded."""
    data = metadata if isinstance(metadata, bytes) else encode_metadata(metadata)
    atomic_write_bytes(os.path.join(directory, METADATA_CHECKSUM_NAME), metadata_checksum_line(data),
                       sync_directory=False)  # the .metadata's rename below syncs the directory for both
    atomic_write_bytes(os.path.join(directory, METADATA_NAME), data)


def metadata_checksum_line(data: bytes) -> bytes:
    return f"xxh3-64 {xxhash.xxh3_64_hexdigest(data)} {len(data)}\n".encode()


def read_verified_metadata_bytes(directory: str) -> tuple[bytes, bool]:
    """``.metadata``'s bytes, checked against its checksum file before anyone decodes them;
    returns (bytes, whether they were verified). A directory without a checksum file (written
    before it existed, or by another tool) is read unverified, its pickle scanned for opcodes
    whose arguments no intact file holds (:func:`checkpointing.base.safe_pickle.check_pickle_bounds`).
    Raises ``FileNotFoundError`` (no ``.metadata``: not committed) or :class:`CheckpointCorruptError`."""
    path = os.path.join(directory, METADATA_NAME)
    with open(path, "rb") as f:
        data = f.read()
    try:
        with open(os.path.join(directory, METADATA_CHECKSUM_NAME), "rb") as f:
            line = f.read(_CHECKSUM_LINE_MAX + 1)
    except FileNotFoundError:
        check_pickle_bounds(data, path)
        return data, False
    expected = _CHECKSUM_LINE.fullmatch(line)
    if expected is None:
        raise CheckpointCorruptError(f"{path}: its checksum file {METADATA_CHECKSUM_NAME} is damaged "
                                     f"({line[:80]!r}); the checkpoint is treated as damaged")
    digest, size = expected.group(1).decode(), int(expected.group(2))
    if len(data) != size or xxhash.xxh3_64_hexdigest(data) != digest:
        raise CheckpointCorruptError(f"{path}: its bytes do not match their checksum ({len(data)} bytes, "
                                     f"{size} written); the checkpoint is damaged, nothing in it was decoded")
    return data, True


def read_metadata(directory: str, trust: bool = False, inert: bool = False) -> Metadata:
    """The committed metadata of ``directory``, with our facts checked to be present.

    Read with a restricted unpickler (``checkpointing.base.safe_pickle``): a ``.metadata`` that names
    anything but DCP's metadata classes raises ``CheckpointUntrustedError`` without running it,
    unless ``trust``. ``Metadata.gpt_ckpt_full_unpickling`` says whether ``trust`` was needed.
    ``inert``: DCP's classes stand in as plain records (``safe_pickle.InertRecord``), without
    importing torch, for a reader of places, sizes and our facts only (``rollback.sh``)."""
    path = os.path.join(directory, METADATA_NAME)
    data, verified = read_verified_metadata_bytes(directory)
    try:
        metadata, trusted = load_dcp_metadata(io.BytesIO(data), path, trust, inert)
    except CheckpointUntrustedError:
        raise
    except Exception as error:  # unpickling damaged bytes raises anything (TypeError, KeyError, MemoryError...)
        raise CheckpointCorruptError(f"{path} cannot be decoded ({type(error).__name__}: {str(error)[:200]}); "
                                     "the checkpoint is damaged") from error
    facts = getattr(metadata, "gpt_ckpt", None)
    if not isinstance(facts, dict) or facts.get("format_version") not in READABLE_FORMATS:
        raise CheckpointCorruptError(
            f"{path} is not a gpt-ckpt checkpoint of format {' or '.join(map(str, READABLE_FORMATS))} (no checksums); "
            "convert it or load it with torch.distributed.checkpoint directly"
        )
    _check_facts(metadata, facts, directory)
    metadata.gpt_ckpt_full_unpickling = trusted
    metadata.gpt_ckpt_verified = verified
    return metadata


def _check_facts(metadata: Metadata, facts: dict, directory: str) -> None:
    """The decoded metadata makes sense: its iteration is its directory's, its parts have the
    types the loader uses. Anything else is damage (a flip the checksum file could not catch)."""
    where = os.path.join(directory, METADATA_NAME)
    iteration = facts.get("iteration")
    named = ITER_DIR.match(os.path.basename(os.path.normpath(directory)))
    if not isinstance(iteration, int) or iteration < 0 or (named and int(named.group(1)) != iteration):
        raise CheckpointCorruptError(f"{where} says iteration {iteration!r}, its directory "
                                     f"{os.path.basename(os.path.normpath(directory))}; the checkpoint is damaged")
    if not (isinstance(facts.get("checksums"), dict) and isinstance(getattr(metadata, "storage_data", None), dict)
            and isinstance(getattr(metadata, "state_dict_metadata", None), dict)):
        raise CheckpointCorruptError(f"{where}: its tables have the wrong types; the checkpoint is damaged")
