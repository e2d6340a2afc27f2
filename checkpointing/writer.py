"""One rank's data file: every chunk a complete ``torch.save`` blob, as DCP's writer makes them.

DCP's ``FileSystemReader`` reads a tensor chunk with ``torch.load`` of the byte range that the
metadata names, and a byte item by handing the range to ``torch.load`` as well. So each chunk is
serialised on its own; its xxh3-64 checksum is taken over exactly those bytes.
"""

from __future__ import annotations

import contextlib
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
    is_writer: bool = True
    """False for a replica: a piece another rank also holds, written only on node-local levels so
    that each node can restore its own ranks without the others (see ``build_metadata``)."""


def standalone(view: torch.Tensor) -> torch.Tensor:
    """The same memory as ``view`` but with a storage of exactly its bytes.

    ``torch.save`` of a slice writes the slice's whole storage (here, a whole flat array); a
    tensor made over just the slice's bytes writes only them, without a copy.
    """
    flat = view.reshape(-1)
    raw = torch.from_numpy(flat.view(torch.uint8).numpy())
    return raw.view(view.dtype).view(view.shape)


class _ChunkSink:
    """A file-like ``torch.save`` streams one chunk into: bytes go straight to the file and into
    the checksum, with no in-memory copy of the blob."""

    def __init__(self, file):
        self.file = file
        self.hash = xxhash.xxh3_64()
        self.length = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.length += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _without_zip_crc32():
    """``torch.save`` writes a zip whose records carry a CRC-32 of their bytes: about 0.35 s of
    CPU per GB here, for bytes our xxh3 checksum already covers (and ``torch.load`` does not check
    it). The option is process-wide; it is restored after the file is written."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _write_chunk(file, value: Any) -> tuple[int, int]:
    """Serialise ``value`` into ``file``; returns (length, xxh3-64 of exactly those bytes)."""
    sink = _ChunkSink(file)
    torch.save(value, sink)
    return sink.length, sink.hash.intdigest()


def write_rank_file(
    directory: str,
    rank: int,
    arrays: dict[str, torch.Tensor],
    pieces: list[TensorPiece],
    objects: dict[str, Any],
    replicas: bool = False,
) -> list[ChunkRecord]:
    """Write this rank's writer pieces and objects to ``directory`` and fsync file and directory.

    With ``replicas`` the rank's other pieces are written too, so that this one file restores
    the rank (node-local levels). ``arrays`` are host (CPU) arrays. Raises
    :class:`CheckpointWriteError` naming the file.
    """
    name = data_file_name(rank)
    path = os.path.join(directory, name)
    records: list[ChunkRecord] = []
    try:
        with open(path, "wb") as f, _without_zip_crc32():
            offset = 0
            # Two pieces over the same bytes (the fp32 weights are the main weights) share one
            # blob: their records point at the same byte range, as DCP allows.
            written: dict[tuple[str, int, tuple[int, ...]], tuple[int, int, int]] = {}
            for piece in pieces:
                if not (piece.is_writer or replicas):
                    continue
                same = (piece.array, piece.start, piece.shape)
                if same not in written:
                    length, checksum = _write_chunk(f, standalone(piece.view(arrays)))
                    written[same] = (offset, length, checksum)
                    offset += length
                at, length, checksum = written[same]
                records.append(ChunkRecord(piece.key, piece.global_offset, piece.shape, piece.global_shape,
                                           arrays[piece.array].dtype, name, at, length, checksum, rank,
                                           piece.is_writer))
            for key, value in objects.items():
                length, checksum = _write_chunk(f, value)
                records.append(ChunkRecord(key, None, None, None, None, name, offset, length, checksum, rank))
                offset += length
            f.flush()
            os.fsync(f.fileno())
            # The bytes are durable: drop them from the page cache, so checkpointing does not
            # fill memory (and make the kernel reclaim it beside training) with data not read.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        fsync_directory(directory)
    except OSError as error:
        raise CheckpointWriteError(error.errno, f"rank {rank} could not write {path}: {error.strerror or error}") from error
    return records
