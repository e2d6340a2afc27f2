"""The global metadata: a stock DCP ``Metadata`` plus this project's facts in one attribute.

``state_dict_metadata``, ``storage_data`` and ``planner_data`` are what DCP's own writer
produces, so ``FileSystemReader`` and ``dcp_to_torch_save`` read a checkpoint without this
project. Our facts (format version, iteration, saving layout, one checksum per chunk) ride along
as ``Metadata.gpt_ckpt``, a dict of builtins: pickle restores it, stock readers ignore it.
"""

from __future__ import annotations

import os
import pickle
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

from checkpointing.durable import atomic_write_bytes
from checkpointing.errors import CheckpointCorruptError
from checkpointing.parallel_layout import ParallelLayout
from checkpointing.rectangles import TilingError, check_tiling
from checkpointing.safe_pickle import load_dcp_metadata

METADATA_NAME = ".metadata"
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
    """The chunks of ``key`` tile it exactly once (:func:`checkpointing.rectangles.check_tiling`);
    ``complete`` False: they overlap nowhere (one node's part of it)."""
    check_tiling(key, global_shape, [c.offsets for c in chunks], [c.sizes for c in chunks], [c.rank for c in chunks],
                 complete)


def build_metadata(records: list[ChunkRecord], iteration: int, layout: ParallelLayout | dict[str, Any],
                   local_files: list[str] | None = None) -> Metadata:
    """DCP metadata of every chunk of ``records``; checks that chunks tile each tensor once.

    Replica records (``is_writer`` False, written on node-local levels) stay out of the DCP
    view, which must tile each tensor once; they are listed in ``gpt_ckpt["replicas"]`` by
    (file, key, offsets). ``local_files``: on a node-local level, the data files this node holds;
    ``records`` are then that node's ranks' only (``checkpointing.commit``: each node's coordinator
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
    # DCP's classes, imported here: importing torch.distributed.checkpoint is slow, and the
    # flusher process would pay it at every start; only a commit needs them.
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


def write_metadata(directory: str, metadata: Metadata) -> None:
    """The commit point: temporary name, fsync, rename, fsync of the directory."""
    atomic_write_bytes(os.path.join(directory, METADATA_NAME), pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))


def read_metadata(directory: str, trust: bool = False) -> Metadata:
    """The committed metadata of ``directory``, with our facts checked to be present.

    Read with a restricted unpickler (``checkpointing.safe_pickle``): a ``.metadata`` that names
    anything but DCP's metadata classes raises ``CheckpointUntrustedError`` without running it,
    unless ``trust``. ``Metadata.gpt_ckpt_full_unpickling`` says whether ``trust`` was needed."""
    path = os.path.join(directory, METADATA_NAME)
    try:
        with open(path, "rb") as f:
            metadata, trusted = load_dcp_metadata(f, path, trust)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, IndexError) as error:
        raise CheckpointCorruptError(f"{path} cannot be read ({error}); the checkpoint is damaged") from error
    facts = getattr(metadata, "gpt_ckpt", None)
    if not isinstance(facts, dict) or facts.get("format_version") not in READABLE_FORMATS:
        raise CheckpointCorruptError(
            f"{path} is not a gpt-ckpt checkpoint of format {' or '.join(map(str, READABLE_FORMATS))} (no checksums); "
            "convert it or load it with torch.distributed.checkpoint directly"
        )
    metadata.gpt_ckpt_full_unpickling = trusted
    return metadata
