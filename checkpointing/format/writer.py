"""One rank's data file: every chunk a complete ``torch.save`` blob, as DCP's writer makes them.

DCP's ``FileSystemReader`` reads a tensor chunk with ``torch.load`` of the byte range that the
metadata names, and a byte item by handing the range to ``torch.load`` as well. So each chunk is
serialised on its own; its xxh3-64 checksum is taken over exactly those bytes. A large chunk may
be preceded by a few KiB of padding, so that its tensor bytes go to the file straight from
memory with ``O_DIRECT`` (``checkpointing.base.direct_io``); no record points at the padding.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import numpy as np
import torch
import xxhash

from checkpointing.base.direct_io import DirectFile
from checkpointing.base.durable import CheckpointWriteError, fsync_directory
from checkpointing.format.items import TensorPiece
from checkpointing.format.metadata import ChunkRecord


def data_file_name(rank: int) -> str:
    """DCP's name for the first file of ``rank``."""
    return f"__{rank}_0.distcp"


def standalone(view: torch.Tensor) -> torch.Tensor:
    """The same memory as ``view`` but with a storage of exactly its bytes.

    ``torch.save`` of a slice writes the slice's whole storage (here, a whole flat array); a
    tensor made over just the slice's bytes writes only them, without a copy.
    """
    flat = view.reshape(-1)
    raw = torch.from_numpy(flat.view(torch.uint8).numpy())
    return raw.view(view.dtype).view(view.shape)


class _Capture:
    """A file-like that ``torch.save`` writes one chunk into. The small writes (zip headers, the
    pickle) are kept as bytes before and after the tensor's storage; the storage itself (the
    payload) is recognised by its address and not copied: it is written later, from memory."""

    def __init__(self, payload: torch.Tensor | None):
        self.address = payload.data_ptr() if payload is not None else 0
        self.nbytes = payload.untyped_storage().nbytes() if payload is not None else 0
        self.before: list[bytes] = []
        self.after: list[bytes] = []
        self.found = False

    def write(self, data) -> int:
        view = memoryview(data)
        if not self.found and self.nbytes and view.nbytes == self.nbytes and _address(view) == self.address:
            self.found = True
        else:  # valid only during the call: keep a copy (small)
            (self.after if self.found else self.before).append(bytes(view))
        return view.nbytes

    def flush(self) -> None:
        pass


_TENSOR_BLOBS: dict[tuple, tuple[bytes, bytes]] = {}
"""The bytes ``torch.save`` writes around a tensor's storage, by (dtype, shape). With the zip
CRC-32 off they depend on nothing else: a contiguous tensor of its own storage pickles as
dtype, shape and stride; sizes and offsets follow from those. Pickling each of a few hundred
chunks per flush costs CPU in proportion to the chunks, while most chunks repeat a few shapes
(one per kind of layer parameter)."""


def _tensor_blob(tensor: torch.Tensor, crc32: bool | None = None) -> tuple[bytes, bytes] | None:
    """(bytes before, bytes after) the storage in ``torch.save(tensor)``; None if the storage is
    not written as one piece (an empty tensor). ``crc32``: whether the zip CRC-32 is on, where
    the caller knows (asking torch each time costs more than the rest of the lookup)."""
    key = (tensor.dtype, tuple(tensor.shape), torch.serialization.get_crc32_options() if crc32 is None else crc32)
    if key in _TENSOR_BLOBS:
        return _TENSOR_BLOBS[key]
    capture = _Capture(tensor)
    torch.save(tensor, capture)
    if not capture.found:
        return None
    blob = b"".join(capture.before), b"".join(capture.after)
    if not key[2]:  # with the CRC on, the bytes depend on the data: never reuse them
        if len(_TENSOR_BLOBS) >= 4096:
            _TENSOR_BLOBS.clear()
        _TENSOR_BLOBS[key] = blob
    return blob


def _owns_its_storage(value: Any) -> bool:
    """A contiguous CPU tensor over exactly its storage (as :func:`standalone` makes): the only
    kind whose ``torch.save`` bytes around the storage depend on dtype and shape alone, and whose
    storage is its own memory. Anything else (a view, a transposed tensor) is saved as is."""
    return (isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.is_contiguous()
            and value.storage_offset() == 0 and value.untyped_storage().nbytes() == value.nbytes)


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


def _memory(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor made by :func:`standalone` (its whole storage), without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


@contextlib.contextmanager
def _without_zip_crc32():
    """``torch.save`` writes a zip whose records carry a CRC-32 of their bytes: CPU for every byte,
    for bytes our xxh3 checksum already covers (and ``torch.load`` does not check
    it). The option is process-wide; it is restored after the file is written."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _write_chunk(file: DirectFile, value: Any) -> tuple[int, int, int]:
    """Serialise ``value`` into ``file`` as ``torch.save`` does; returns (offset, length, xxh3-64
    of exactly those bytes). A tensor made by :func:`standalone` is written from its memory,
    after padding that aligns it for ``O_DIRECT``."""
    blob = _tensor_blob(value, crc32=False) if _owns_its_storage(value) else None
    if blob is None:
        capture = _Capture(None)
        torch.save(value, capture)
        before = b"".join(capture.before)
        offset = file.position
        file.write(before)
        return offset, file.position - offset, xxhash.xxh3_64_intdigest(before)
    return _write_framed(file, blob, _memory(value), value.data_ptr())


def _write_framed(file: DirectFile, blob: tuple[bytes, bytes], payload: memoryview, address: int) -> tuple[int, int, int]:
    """Write a tensor's ``torch.save`` bytes: ``blob``'s head, the ``payload`` at memory
    ``address`` (after padding that aligns it for ``O_DIRECT``), ``blob``'s tail; returns (offset,
    length, xxh3-64 of exactly those bytes)."""
    before, after = blob
    gap = file.gap_before(len(before), address, payload.nbytes)
    if gap:
        file.write(bytes(gap))
    offset = file.position
    digest = xxhash.xxh3_64(before)
    file.write(before)
    digest.update(payload)
    file.write_memory(payload, address)
    digest.update(after)
    file.write(after)
    return offset, file.position - offset, digest.intdigest()


class _PieceBytes:
    """The bytes of each piece of the flat host arrays, by slicing one ``uint8`` view per array:
    a handful of C calls per piece instead of a dozen torch ones (a flush writes hundreds)."""

    def __init__(self, arrays: dict[str, torch.Tensor]):
        self.arrays = arrays
        self._bytes: dict[str, tuple[np.ndarray, int, int]] = {}

    def of(self, piece: TensorPiece) -> tuple[memoryview, int]:
        """(the piece's bytes, their address)."""
        if piece.array not in self._bytes:
            array = self.arrays[piece.array]
            if array.device.type != "cpu" or not array.is_contiguous():
                raise ValueError(f"array {piece.array!r} is not a contiguous host array")
            raw = array.reshape(-1).view(torch.uint8).numpy()
            self._bytes[piece.array] = raw, array.element_size(), array.data_ptr()
        raw, size, base = self._bytes[piece.array]
        lo = piece.start * size
        return memoryview(raw[lo : lo + piece.numel * size]), base + lo


def write_rank_file(
    directory: str,
    rank: int,
    arrays: dict[str, torch.Tensor],
    pieces: list[TensorPiece],
    small_state: dict[str, Any],
    replicas: bool = False,
    write_rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ChunkRecord]:
    """Write this rank's writer pieces and its small state (each item a byte item) to
    ``directory`` and fsync file and directory.

    With ``replicas`` the rank's other pieces are written too, so that this one file restores
    the rank (node-local levels). ``write_rate`` (bytes/s) paces the writes. ``progress(i)`` is
    called once piece ``i`` is written (or passed over): its bytes in ``arrays`` may change from
    then on (zero-copy snapshots overwrite a slot behind its flush). ``arrays`` are host
    (CPU) arrays. Raises
    :class:`CheckpointWriteError` naming the file.
    """
    name = data_file_name(rank)
    path = os.path.join(directory, name)
    records: list[ChunkRecord] = []
    try:
        with DirectFile(path, rate=write_rate) as f, _without_zip_crc32():
            # Two pieces over the same bytes (the fp32 weights are the main weights) share one
            # blob: their records point at the same byte range, as DCP allows.
            written: dict[tuple[str, int, tuple[int, ...]], tuple[int, int, int]] = {}
            piece_bytes = _PieceBytes(arrays)
            for index, piece in enumerate(pieces):
                if not (piece.is_writer or replicas):
                    if progress is not None:
                        progress(index)
                    continue
                same = (piece.array, piece.start, piece.shape)
                if same not in written:
                    payload, address = piece_bytes.of(piece)
                    blob = _TENSOR_BLOBS.get((arrays[piece.array].dtype, piece.shape, False)) if payload.nbytes else None
                    if blob is None:  # first of its dtype and shape (or empty): framed by torch.save
                        written[same] = _write_chunk(f, standalone(piece.view(arrays)))
                    else:
                        written[same] = _write_framed(f, blob, payload, address)
                at, length, checksum = written[same]
                records.append(ChunkRecord(piece.key, piece.global_offset, piece.shape, piece.global_shape,
                                           arrays[piece.array].dtype, name, at, length, checksum, rank,
                                           piece.is_writer))
                if progress is not None:
                    progress(index)
            for key, value in small_state.items():
                at, length, checksum = _write_chunk(f, value)
                records.append(ChunkRecord(key, None, None, None, None, name, at, length, checksum, rank))
        fsync_directory(directory)
    except OSError as error:
        raise CheckpointWriteError(error.errno, f"rank {rank} could not write {path}: {error.strerror or error}") from error
    return records


def tensor_chunk_length(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """The bytes :func:`write_rank_file` writes for a tensor piece of ``dtype`` and ``shape``
    (without ``O_DIRECT`` padding): what the scale simulator (``benchmarks.scale``) places."""
    with _without_zip_crc32():
        value = torch.empty(shape, dtype=dtype)  # never touched: only its size is framed
        before, after = _tensor_blob(value)
    return len(before) + value.nbytes + len(after)
