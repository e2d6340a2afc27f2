"""One rank's data file: every chunk a complete ``torch.save`` blob, as DCP's writer makes them.

DCP's ``FileSystemReader`` reads a tensor chunk with ``torch.load`` of the byte range that the
metadata names, and a byte item by handing the range to ``torch.load`` as well. So each chunk is
serialised on its own; its xxh3-64 checksum is taken over exactly those bytes. A large chunk may
be preceded by a few KiB of padding, so that its tensor bytes go to the file straight from
memory with ``O_DIRECT`` (``checkpointing.base.direct_io``); no record points at the padding.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import xxhash

from checkpointing.base.direct_io import BLOCK, DirectFile, gap_for
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


_CRC32_OPTION = threading.RLock()
"""Held while the CRC-32 option is off: a flusher encodes a small state in its receiving thread
(:func:`encode_item`) while its main thread may be working a layout out, and neither may put the
option back under the other (a layout's cached framing must be CRC-free)."""


@contextlib.contextmanager
def _without_zip_crc32():
    """``torch.save`` writes a zip whose records carry a CRC-32 of their bytes: CPU for every byte,
    for bytes our xxh3 checksum already covers (and ``torch.load`` does not check
    it). The option is process-wide; it is restored after the file is written."""
    with _CRC32_OPTION:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(previous)


@dataclass(frozen=True)
class EncodedItem:
    """A small-state value already serialised as its byte item: the ``torch.save`` bytes (zip
    CRC-32 off) that :func:`write_rank_file` would write for it. A flusher encodes each request's
    small state once, when it describes the L0 slot, and writes the same bytes to the
    description and to every level's rank file: ``torch.save`` of the small state (RNG states,
    arguments; ~35 KB) twice a version was ~3 ms of its CPU."""

    blob: bytes


def encode_item(value: Any) -> EncodedItem:
    """``value``'s byte item, as :func:`write_rank_file` writes it."""
    capture = _Capture(None)
    with _without_zip_crc32():
        torch.save(value, capture)
    return EncodedItem(b"".join(capture.before))


def _write_chunk(file: DirectFile, value: Any) -> tuple[int, int, int]:
    """Serialise ``value`` into ``file`` as ``torch.save`` does; returns (offset, length, xxh3-64
    of exactly those bytes). A tensor made by :func:`standalone` is written from its memory,
    after padding that aligns it for ``O_DIRECT``; an :class:`EncodedItem` as its bytes."""
    if isinstance(value, EncodedItem):
        offset = file.position
        file.write(value.blob)
        return offset, len(value.blob), xxhash.xxh3_64_intdigest(value.blob)
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
    offset = file.position + gap
    checksum = file.write_framed(gap, before, payload, address, after)
    return offset, file.position - offset, checksum


class RankFileLayout:
    """Where each piece of one set of host arrays (a pool slot) goes in a rank file, and the
    bytes that frame it: computed once, then every version written from the same arrays follows
    it. A flush writes hundreds of pieces, and working each one's framing, padding and place out
    again per version was most of the flusher's CPU (``scripts/bench_startup.py --part cpu-per-gb``).

    The layout depends on the arrays' addresses (the ``O_DIRECT`` padding aligns each large chunk's
    file offset with its memory), on ``replicas`` and on whether the file is written ``direct``:
    :meth:`fits` says whether it still holds."""

    def __init__(self, arrays: dict[str, torch.Tensor], pieces: list[TensorPiece], replicas: bool, direct: bool):
        self.key = _layout_key(arrays, replicas, direct)
        self.pieces = tuple(pieces)
        self.steps: list[tuple | None] = []
        """Per piece: (gap, head, array, first byte, end byte, address, tail) of the chunk it
        writes; None when it writes nothing (not its rank's to write, or bytes an earlier piece wrote)."""
        self.records: list[tuple | None] = []
        """Per piece: its ChunkRecord's fields but the checksum and after, and the index of its
        chunk's checksum; None when it is not in the file."""
        position = 0
        written: dict[tuple[str, int, tuple[int, ...]], tuple[int, int, int]] = {}
        with _without_zip_crc32():
            for piece in pieces:
                if not (piece.is_writer or replicas):
                    self.steps.append(None)
                    self.records.append(None)
                    continue
                same = (piece.array, piece.start, piece.shape)
                array = arrays[piece.array]
                if same in written:
                    self.steps.append(None)
                else:
                    if not (array.device.type == "cpu" and array.is_contiguous()):
                        raise ValueError(f"array {piece.array!r} is not a contiguous host array")
                    size = array.element_size()
                    lo, hi = piece.start * size, (piece.start + piece.numel) * size
                    blob = _tensor_blob(standalone(piece.view(arrays)), crc32=False) if hi > lo else None
                    if blob is None:  # an empty piece: torch.save's bytes are all framing
                        capture = _Capture(None)
                        torch.save(standalone(piece.view(arrays)), capture)
                        blob = b"".join(capture.before), b""
                    head, tail = blob
                    address = array.data_ptr() + lo
                    gap = gap_for(position, len(head), address, hi - lo, direct)
                    offset, length = position + gap, len(head) + (hi - lo) + len(tail)
                    position = offset + length
                    written[same] = (offset, length, len(written))
                    self.steps.append((gap, head, piece.array, lo, hi, address, tail))
                offset, length, chunk = written[same]
                self.records.append(((piece.key, piece.global_offset, piece.shape, piece.global_shape, array.dtype),
                                     offset, length, chunk, piece.is_writer))
        self.end = position
        """Where the pieces end: the small state follows."""
        self.chunk_bytes = sum(length for _, length, _ in written.values())
        """The bytes of the tensor chunks (each byte range once, padding apart)."""
        self.record_chunks = np.array([r[3] for r in self.records if r is not None], dtype=np.intp)
        """Per record (pieces over the same bytes share a chunk): the index of its chunk's checksum."""

    def rebased(self, arrays: dict[str, torch.Tensor]) -> RankFileLayout | None:
        """This layout for other ``arrays`` of the same names, sizes and dtypes whose addresses
        differ from this layout's by whole blocks (another pool slot: slots are page-aligned
        mappings with the arrays at the same offsets): every gap, frame and place is the same,
        only the addresses move. None where they do not differ so. Working a layout out costs
        ~20 ms for ~600 pieces; a pool's other slots take it from the first."""
        replicas, direct, described = self.key
        if [(name, nbytes, dtype) for name, _, nbytes, dtype in described] != \
                [(name, t.nbytes, t.dtype) for name, t in arrays.items()]:
            return None
        moved = {name: arrays[name].data_ptr() - address for name, address, _, _ in described}
        if any(delta % BLOCK for delta in moved.values()):
            return None
        layout = copy.copy(self)
        layout.key = _layout_key(arrays, replicas, direct)
        layout.steps = [None if step is None else (*step[:5], step[5] + moved[step[2]], step[6]) for step in self.steps]
        return layout

    def fits(self, arrays: dict[str, torch.Tensor], pieces: list[TensorPiece], replicas: bool, direct: bool) -> bool:
        """The same arrays at the same addresses, the same pieces (by identity first: a tuple
        compare), the same replicas and O_DIRECT."""
        return self.key == _layout_key(arrays, replicas, direct) and self.pieces == tuple(pieces)

    def write(self, file: DirectFile, arrays: dict[str, torch.Tensor], name: str,
              progress: Callable[[int], None] | None, progress_points: Sequence[bool] | None = None) -> list[int]:
        """Write the pieces of ``arrays`` (this layout's) to ``file``, named ``name``; returns the
        xxh3-64 of each chunk written, in order (:meth:`chunk_records` makes their records).

        ``progress(i)``: pieces ``0..i`` are written (or passed over) and their bytes have left
        ``arrays``; called with increasing ``i``, for the last piece at the end. It comes as soon
        as the file holds none of their memory after each piece that ``progress_points`` marks
        (every piece when None), and after each batch the file writes (a sign of life between
        points). A caller that acts only where a shard ends marks those pieces: a call per piece
        of ~600 was ~0.5 ms of a flusher's CPU a version."""
        if file.position != 0:
            raise ValueError(f"{name}: the pieces' layout starts at offset 0, the file is at {file.position}")
        views = {a: memoryview(t.reshape(-1).view(torch.uint8).numpy()) for a, t in arrays.items()}
        checksums: list[int] = []
        write_framed = file.write_framed
        due = False
        """A marked piece, or a batch written, since the last report."""
        reported, batches = -1, file.batches
        for index, step in enumerate(self.steps):
            if step is not None:
                gap, head, array, lo, hi, address, tail = step
                checksums.append(write_framed(gap, head, views[array][lo:hi], address, tail))
            if progress is not None:
                if progress_points is None or progress_points[index] or file.batches != batches:
                    due = True
                if due and not file.holds_caller_memory:  # every piece so far has left the arrays
                    progress(index)
                    reported, due, batches = index, False, file.batches
        last = len(self.steps) - 1
        if progress is not None and reported < last:
            file.flush()
            progress(last)
        if file.position != self.end:  # the layout and the writer disagree: never commit such a file
            raise ValueError(f"{name}: the pieces end at offset {file.position}, their layout says {self.end}")
        return checksums

    def chunk_records(self, name: str, rank: int, checksums: list[int]) -> list[ChunkRecord]:
        """The record of each piece in the file ``name`` of ``rank``, with the chunks' ``checksums``
        (:meth:`write`'s)."""
        return [ChunkRecord(*fields, name, offset, length, checksums[chunk], rank, writer)
                for fields, offset, length, chunk, writer in filter(None, self.records)]


def _layout_key(arrays: dict[str, torch.Tensor], replicas: bool, direct: bool) -> tuple:
    return replicas, direct, tuple((name, t.data_ptr(), t.nbytes, t.dtype) for name, t in arrays.items())


LAYOUTS_KEPT = 16
"""Layouts a caller's cache holds at most (one per pool slot and level is the steady state)."""


class RankFileWrite:
    """What one rank file holds: its :class:`RankFileLayout`'s tensor chunks with this version's
    checksums, then the small state's byte items. The tensor chunks' records are made only when
    asked for (:meth:`records`): a level's save plan that has checked the layout once sends the
    checksums alone (``checkpointing.format.save_plan``), and making ~600 records per version was
    a tenth of the flusher's CPU on small pieces."""

    def __init__(self, layout: RankFileLayout, name: str, rank: int, checksums: list[int], items: list[ChunkRecord]):
        self.layout, self.name, self.rank = layout, name, rank
        self.checksums = checksums
        """The xxh3-64 of each tensor chunk, in the layout's order."""
        self.items = items
        """The byte items' records (the small state)."""

    def record_checksums(self) -> np.ndarray:
        """The checksum of each tensor piece's record, in :meth:`records`' order (uint64)."""
        return np.asarray(self.checksums, dtype=np.uint64)[self.layout.record_chunks]

    def records(self) -> list[ChunkRecord]:
        """Every chunk's record: the tensor pieces' (``layout.pieces`` order), then the byte items'."""
        return self.layout.chunk_records(self.name, self.rank, self.checksums) + self.items

    @property
    def nbytes(self) -> int:
        """The bytes of the chunks (each byte range once, padding apart)."""
        return self.layout.chunk_bytes + sum(r.length for r in self.items)


def write_rank_file(
    directory: str,
    rank: int,
    arrays: dict[str, torch.Tensor],
    pieces: list[TensorPiece],
    small_state: dict[str, Any],
    replicas: bool = False,
    write_rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    layouts: dict[tuple, RankFileLayout] | None = None,
    progress_points: Sequence[bool] | None = None,
) -> list[ChunkRecord]:
    """:func:`write_rank_file_version`, returning every chunk's record: the pieces' (in their
    order), then the small state's byte items'."""
    return write_rank_file_version(directory, rank, arrays, pieces, small_state, replicas, write_rate, progress,
                                   layouts, progress_points).records()


def write_rank_file_version(
    directory: str,
    rank: int,
    arrays: dict[str, torch.Tensor],
    pieces: list[TensorPiece],
    small_state: dict[str, Any],
    replicas: bool = False,
    write_rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    layouts: dict[tuple, RankFileLayout] | None = None,
    progress_points: Sequence[bool] | None = None,
) -> RankFileWrite:
    """Write this rank's writer pieces and its small state (each item a byte item; a value may
    be an :class:`EncodedItem`) to ``directory`` and fsync file and directory.

    With ``replicas`` the rank's other pieces are written too, so that this one file restores
    the rank (node-local levels). ``write_rate`` (bytes/s) paces the writes. ``progress(i)``:
    pieces ``0..i`` are written (or passed over), so their bytes in ``arrays`` may change from
    then on (zero-copy snapshots overwrite a slot behind its flush); called after the pieces
    that ``progress_points`` marks (every piece when None) and at the end
    (:meth:`RankFileLayout.write`). ``arrays`` are host (CPU) arrays. ``layouts``: the caller's
    cache of :class:`RankFileLayout` (a level's, kept across versions:
    ``checkpointing.format.save_plan``); None: the layout is worked out for this file alone. Returns what the file holds (:class:`RankFileWrite`); raises
    :class:`CheckpointWriteError` naming the file.
    """
    name = data_file_name(rank)
    path = os.path.join(directory, name)
    try:
        with DirectFile(path, rate=write_rate) as f:
            key = _layout_key(arrays, replicas, f.direct)
            layout = layouts.get(key) if layouts is not None else None
            if layout is None or not layout.fits(arrays, pieces, replicas, f.direct):
                layout = next((moved for other in (layouts or {}).values()
                               if other.pieces == tuple(pieces) and other.key[:2] == (replicas, f.direct)
                               and (moved := other.rebased(arrays)) is not None), None)
                layout = layout or RankFileLayout(arrays, pieces, replicas, f.direct)
                if layouts is not None:
                    if len(layouts) >= LAYOUTS_KEPT:
                        layouts.clear()
                    layouts[key] = layout
            # Two pieces over the same bytes (the fp32 weights are the main weights) share one
            # blob: their records point at the same byte range, as DCP allows.
            checksums = layout.write(f, arrays, name, progress, progress_points)
            items = []
            with _without_zip_crc32():
                for item, value in small_state.items():
                    at, length, checksum = _write_chunk(f, value)
                    items.append(ChunkRecord(item, None, None, None, None, name, at, length, checksum, rank))
        fsync_directory(directory)
    except OSError as error:
        raise CheckpointWriteError(error.errno, f"rank {rank} could not write {path}: {error.strerror or error}") from error
    return RankFileWrite(layout, name, rank, checksums, items)


def tensor_chunk_length(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """The bytes :func:`write_rank_file` writes for a tensor piece of ``dtype`` and ``shape``
    (without ``O_DIRECT`` padding): what the scale simulator (``benchmarks.scale``) places."""
    with _without_zip_crc32():
        value = torch.empty(shape, dtype=dtype)  # never touched: only its size is framed
        before, after = _tensor_blob(value)
    return len(before) + value.nbytes + len(after)
