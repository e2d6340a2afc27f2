"""One rank's data file: every chunk a complete ``torch.save`` blob, as DCP's writer makes them.

DCP's ``FileSystemReader`` reads a tensor chunk with ``torch.load`` of the byte range that the
metadata names, and a byte item by handing the range to ``torch.load`` as well. So each chunk is
serialised on its own; its xxh3-64 checksum is taken over exactly those bytes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from checkpointing.durable import CheckpointWriteError, fsync_directory
from checkpointing.items import TensorPiece


def data_file_name(rank: int) -> str:
    """DCP's name for the first file of ``rank``."""
    return f"__{rank}_0.distcp"


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


def standalone(view: torch.Tensor) -> torch.Tensor:
    """The same memory as ``view`` but with a storage of exactly its bytes.

    ``torch.save`` of a slice writes the slice's whole storage (here, a whole flat array); a
    tensor made over just the slice's bytes writes only them, without a copy.
    """
    flat = view.reshape(-1)
    raw = torch.from_numpy(flat.view(torch.uint8).numpy())
    return raw.view(view.dtype).view(view.shape)


def _serialise(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getbuffer()


def write_rank_file(
    directory: str,
    rank: int,
    arrays: dict[str, torch.Tensor],
    pieces: list[TensorPiece],
    objects: dict[str, Any],
    fault=None,
) -> list[ChunkRecord]:
    """Write this rank's writer pieces and objects to ``directory`` and fsync file and directory.

    ``arrays`` are host (CPU) arrays. Raises :class:`CheckpointWriteError` naming the file.
    ``fault``, a test hook, is called with the open file object after each chunk.
    """
    name = data_file_name(rank)
    path = os.path.join(directory, name)
    records: list[ChunkRecord] = []
    try:
        with open(path, "wb") as f:
            offset = 0
            for piece in pieces:
                if not piece.is_writer:
                    continue
                blob = _serialise(standalone(piece.view(arrays)))
                f.write(blob)
                records.append(ChunkRecord(piece.key, piece.global_offset, piece.shape, piece.global_shape,
                                           arrays[piece.array].dtype, name, offset, len(blob),
                                           xxhash.xxh3_64_intdigest(blob), rank))
                offset += len(blob)
                if fault is not None:
                    fault(f)
            for key, value in objects.items():
                blob = _serialise(value)
                f.write(blob)
                records.append(ChunkRecord(key, None, None, None, None, name, offset, len(blob),
                                           xxhash.xxh3_64_intdigest(blob), rank))
                offset += len(blob)
            f.flush()
            os.fsync(f.fileno())
        fsync_directory(directory)
    except OSError as error:
        raise CheckpointWriteError(error.errno, f"rank {rank} could not write {path}: {error.strerror or error}") from error
    return records
