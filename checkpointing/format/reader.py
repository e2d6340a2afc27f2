"""Read rectangles of global tensors out of a committed checkpoint: the resharding load.

A rank asks for :class:`TensorPiece` rectangles in its current layout. Each is assembled from
whichever stored chunks overlap it, whatever layout wrote them. Every chunk is read once, in
file order, and verified against its checksum before any of its bytes are used.

How the bytes travel, so that a restore reads at the disk's speed rather than waiting on each
chunk in turn (``results/design_measurements_cpu.md`` has the figures): a thread of its own (``ckpt-read``) reads each data file in large ranges, several chunks per read, with
``O_DIRECT`` where the file system takes it, into a few reused buffers in huge pages, ahead of
their use. Meanwhile the calling thread checks each chunk's xxh3-64 over the buffer (no copy),
decodes it where it lies (``checkpointing.format.chunk_decode``: the zip and pickle framing parsed,
nothing executed; a chunk it does not recognise goes through ``torch.load(weights_only=True)``
as before) and copies its elements straight into the live arrays: one copy per byte, and the
reads overlap the checking and copying.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import xxhash
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from checkpointing.base.errors import CheckpointCorruptError
from checkpointing.base.safe_pickle import load_objects
from checkpointing.format.chunk_decode import FramingError, decode_tensor
from checkpointing.format.items import TensorPiece
from checkpointing.format.load_plan import ChunkIndex, wanted_chunks
from checkpointing.format.metadata import read_metadata
from checkpointing.format.rectangles import overlap

BLOCK = 4096
"""Alignment of ``O_DIRECT`` reads (offset, length, memory), as in ``checkpointing.base.direct_io``."""

READ_WINDOW = 32 << 20
"""Bytes per read: consecutive chunks of a file are read together up to this size; a larger
chunk is read whole, into a buffer of its own."""

READ_GAP = 1 << 20
"""Bytes between two wanted chunks of a file (chunks another rank reads, or not wanted) that are
read through rather than starting another read."""

READ_BUFFERS = 3
"""Buffers of :data:`READ_WINDOW` in turn: one being checked and copied, the others being read."""

LARGE_BUFFERS = 2
"""Buffers for chunks larger than :data:`READ_WINDOW`, each of its chunk's size: one being
checked and copied while the next is read."""


def _rank_of(file_name: str) -> str:
    # DCP names files __{rank}_{n}.distcp
    return file_name[2:].split("_")[0] if file_name.startswith("__") else "?"


class CheckpointReader:
    """One committed checkpoint directory, opened for reading."""

    def __init__(self, directory: str, verify: bool = True, trust_pickles: bool = False):
        """``trust_pickles``: read pickles that need more than data classes (a checkpoint of an
        older format, or a tampered one) with full unpickling; see ``checkpointing.base.safe_pickle``."""
        self.directory = directory
        self.verify = verify
        self.trust_pickles = trust_pickles
        self.metadata = read_metadata(directory, trust_pickles)
        self.full_unpickling: bool = self.metadata.gpt_ckpt_full_unpickling
        """Whether reading needed full unpickling so far (only with ``trust_pickles``)."""
        self.facts = self.metadata.gpt_ckpt
        self.iteration: int = self.facts["iteration"]
        self.chunk_index = ChunkIndex(self.metadata)
        """The stored chunks of each key, indexed when a load first asks for the key."""

    # -- raw chunks -----------------------------------------------------------------------------
    def _read_blob(self, key: str, index: MetadataIndex) -> bytes:
        info = self.metadata.storage_data[index]
        return self._read_range(key, info.relative_path, info.offset, info.length)

    def _read_range(self, key: str, relative_path: str, offset: int, length: int) -> bytes:
        path = os.path.join(self.directory, relative_path)
        where = f"{path} (tensor {key}, written by rank {_rank_of(relative_path)})"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                blob = f.read(length)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"missing data file {where}") from None
        except OSError as error:
            raise CheckpointCorruptError(f"cannot read {where}: {error}") from error
        if len(blob) != length:
            raise CheckpointCorruptError(
                f"truncated data file {where}: {len(blob)} of {length} bytes at offset {offset}")
        if self.verify:
            expected = self.facts["checksums"].get((relative_path, offset))
            if expected is None or xxhash.xxh3_64_intdigest(blob) != expected:
                raise CheckpointCorruptError(f"checksum mismatch in {where} at offset {offset}")
        return blob

    def _decode(self, blob: bytes, where: str):
        value, trusted = load_objects(blob, where, self.trust_pickles)
        self.full_unpickling |= trusted
        return value

    # -- the small state's items ------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def object_file(self, key: str) -> str | None:
        """The data file that holds byte item ``key`` (None: not in this checkpoint)."""
        info = self.metadata.storage_data.get(MetadataIndex(key))
        return info.relative_path if info is not None else None

    def read_object(self, key: str) -> Any:
        if key not in self.metadata.state_dict_metadata:
            raise CheckpointCorruptError(f"{self.directory} has no item {key!r}")
        return self._decode(self._read_blob(key, MetadataIndex(key)), f"item {key} of {self.directory}")

    def tensor_keys(self) -> set[str]:
        return {k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    # -- tensors ----------------------------------------------------------------------------------
    def padded_rows_allowed(self, keys: frozenset[str]) -> frozenset[str]:
        """Of ``keys`` (tensors with a padded vocabulary dimension), those this checkpoint may
        store with more rows than the true vocabulary: all of them in format 1, none after."""
        return keys if self.facts.get("format_version", 1) < 2 else frozenset()

    def read_pieces(self, pieces: list[TensorPiece], arrays: dict[str, torch.Tensor],
                    longer_rows: frozenset[str] = frozenset()) -> int:
        """Fill every piece of ``arrays`` from the checkpoint; returns the bytes read.

        ``longer_rows``: keys whose stored tensor may have more rows than the piece's global
        shape (a format-1 checkpoint's padded vocabulary, see :meth:`padded_rows_allowed`); the
        extra rows are not read.

        Raises :class:`CheckpointMismatchError` if a tensor is missing or has another global
        shape, and :class:`CheckpointCorruptError` if a chunk is damaged.
        """
        wanted, sizes = wanted_chunks(self.metadata, self.chunk_index, pieces, longer_rows, self.directory)
        covered = {id(p): 0 for p in pieces}
        # One read per stored blob: two keys may point at the same bytes (fp32 weights = main
        # weights), read and decoded once.
        blobs: dict[tuple[str, int], _Blob] = {}
        for key, offsets in wanted:
            info = self.metadata.storage_data[MetadataIndex(key, offsets)]
            blob = blobs.get((info.relative_path, info.offset))
            if blob is None:
                blob = blobs[(info.relative_path, info.offset)] = _Blob(info.relative_path, info.offset, info.length, key)
            blob.uses.append((key, offsets))

        total = 0
        with contextlib.closing(self._chunks(list(blobs.values()))) as chunks:
            for blob, data in chunks:
                total += self._fill_pieces(blob, data, wanted, sizes, arrays, covered)
        for piece in pieces:
            if covered[id(piece)] != piece.numel:
                raise CheckpointCorruptError(
                    f"{piece.key}: the chunks in {self.directory} cover {covered[id(piece)]} of the "
                    f"{piece.numel} elements at {piece.global_offset}")
        return total

    def files_for(self, pieces: list[TensorPiece]) -> set[str]:
        """The data files holding the stored chunks that ``pieces`` overlap (of the tensors this
        checkpoint has): where a load of them reads."""
        stored = self.tensor_keys()
        wanted, _ = wanted_chunks(self.metadata, self.chunk_index, [p for p in pieces if p.key in stored],
                                  frozenset(), self.directory)
        return {self.metadata.storage_data[MetadataIndex(key, offsets)].relative_path for key, offsets in wanted}

    def _fill_pieces(self, blob: "_Blob", data: memoryview, wanted: dict, sizes: dict, arrays: dict[str, torch.Tensor],
                     covered: dict[int, int]) -> int:
        """Copy one verified chunk into every piece it overlaps; returns its length."""
        key, offsets = blob.uses[0]
        chunk = self._decode_chunk(data, f"chunk {offsets} of {key} in {self.directory}")
        for key, offsets in blob.uses:
            stored = sizes[(key, offsets)]
            if tuple(chunk.shape) != stored:
                raise CheckpointCorruptError(f"{key} at {offsets} in {self.directory}: stored shape "
                                             f"{tuple(chunk.shape)}, the metadata says {stored}")
            for piece in wanted[(key, offsets)]:
                region = overlap(piece.global_offset, piece.shape, offsets, stored)
                src = chunk[tuple(slice(a - o, b - o) for (a, b), o in zip(region, offsets))]
                dst = piece.view(arrays)[tuple(slice(a - o, b - o) for (a, b), o in zip(region, piece.global_offset))]
                _copy(dst, src)
                covered[id(piece)] += src.numel()
        return blob.length


    @property
    def local_files(self) -> list[str] | None:
        """On a node-local level: the data files this node's directory holds; else None."""
        return self.facts.get("local_files")

    def read_own_pieces(self, file_name: str, pieces: list[TensorPiece], arrays: dict[str, torch.Tensor],
                        longer_rows: frozenset[str] = frozenset()) -> int:
        """Fill ``pieces`` from ``file_name`` alone: the pieces that rank saved itself, replicas
        included (a node-local level, read back in the saving layout). Returns the bytes read.
        ``longer_rows``: as in :meth:`read_pieces` (a stored chunk may hold padded rows after
        the piece's)."""
        replicas = self.facts.get("replicas") or {}
        blobs: dict[int, _Blob] = {}
        for piece in pieces:
            offsets = tuple(piece.global_offset)
            info = self.metadata.storage_data.get(MetadataIndex(piece.key, offsets))
            if info is not None and info.relative_path == file_name and info.length:
                offset, length = info.offset, info.length
            elif (file_name, piece.key, offsets) in replicas:
                offset, length = replicas[(file_name, piece.key, offsets)]
            else:
                raise CheckpointCorruptError(
                    f"{os.path.join(self.directory, file_name)} holds no copy of {piece.key} at {offsets}; "
                    "was it saved in another layout?")
            blob = blobs.get(offset)
            if blob is None:
                blob = blobs[offset] = _Blob(file_name, offset, length, piece.key)
            blob.uses.append(piece)
        total = 0
        with contextlib.closing(self._chunks(list(blobs.values()))) as chunks:
            for blob, data in chunks:
                total += blob.length
                for piece in blob.uses:
                    offsets = tuple(piece.global_offset)
                    chunk = self._decode_chunk(data, f"chunk {offsets} of {piece.key} in {self.directory}")
                    if piece.key in longer_rows and chunk.dim() == len(piece.shape) and chunk.shape[0] > piece.shape[0]:
                        chunk = chunk[: piece.shape[0]]  # format 1: the padded vocabulary rows follow
                    if tuple(chunk.shape) != tuple(piece.shape):
                        raise CheckpointCorruptError(f"{piece.key} at {offsets} in {self.directory}: stored shape "
                                                     f"{tuple(chunk.shape)}, expected {tuple(piece.shape)}")
                    _copy(piece.view(arrays), chunk)
                    del chunk  # a view of the read buffer, which is read into again
        return total

    # -- the read pipeline ----------------------------------------------------------------------
    def _decode_chunk(self, data: memoryview, where: str) -> torch.Tensor:
        """The tensor in ``data`` (a verified chunk): over ``data``'s memory where the decoder
        recognises a plain tensor, else as ``torch.load(weights_only=True)`` reads it."""
        try:
            return decode_tensor(data)
        except FramingError:
            pass
        value = self._decode(bytes(data), where)
        if not isinstance(value, torch.Tensor):
            raise CheckpointCorruptError(f"cannot decode {where}: it holds a {type(value).__name__}, not a tensor")
        return value

    def _chunks(self, blobs: list["_Blob"]) -> Iterator[tuple["_Blob", memoryview]]:
        """Each of ``blobs`` in file order with its bytes, verified. The bytes are a view of a
        read buffer, valid until the next item is asked for. Raises
        :class:`CheckpointCorruptError` (missing or short file, checksum mismatch) at the first
        blob affected, as a read of that blob alone would."""
        segments = _segments(sorted(blobs, key=lambda b: (b.relative_path, b.offset)))
        ahead = _ReadAhead(self.directory, segments)
        try:
            for segment in segments:
                buffer, got, error = ahead.next(segment)
                for blob in segment.blobs:
                    path = os.path.join(self.directory, blob.relative_path)
                    where = f"{path} (tensor {blob.key}, written by rank {_rank_of(blob.relative_path)})"
                    if isinstance(error, FileNotFoundError):
                        raise CheckpointCorruptError(f"missing data file {where}") from None
                    if isinstance(error, OSError):
                        raise CheckpointCorruptError(f"cannot read {where}: {error}") from error
                    if error is not None:
                        raise error
                    start = blob.offset - segment.start
                    have = max(0, min(blob.length, got - start))
                    if have != blob.length:
                        raise CheckpointCorruptError(
                            f"truncated data file {where}: {have} of {blob.length} bytes at offset {blob.offset}")
                    data = memoryview(buffer)[start : start + blob.length]
                    if self.verify:
                        expected = self.facts["checksums"].get((blob.relative_path, blob.offset))
                        if expected is None or xxhash.xxh3_64_intdigest(data) != expected:
                            raise CheckpointCorruptError(f"checksum mismatch in {where} at offset {blob.offset}")
                    yield blob, data
                    del data
                ahead.release(segment, buffer)
                del buffer
        finally:
            ahead.close()


@dataclass
class _Blob:
    """One stored chunk to read, and what it fills."""

    relative_path: str
    offset: int
    length: int
    key: str
    """The first key over these bytes: the one error messages name."""
    uses: list = field(default_factory=list)


@dataclass
class _Segment:
    """One read: [start, start + size) of a data file, aligned to :data:`BLOCK`, holding ``blobs``."""

    relative_path: str
    start: int
    size: int
    blobs: list[_Blob]


def _segments(blobs: list[_Blob]) -> list[_Segment]:
    """Group ``blobs`` (in file order) into reads of up to :data:`READ_WINDOW` bytes each."""
    segments: list[_Segment] = []
    for blob in blobs:
        end = -(-(blob.offset + blob.length) // BLOCK) * BLOCK
        last = segments[-1] if segments else None
        if (last is not None and last.relative_path == blob.relative_path
                and blob.offset - (last.start + last.size) <= READ_GAP and end - last.start <= READ_WINDOW):
            last.size = max(last.size, end - last.start)
            last.blobs.append(blob)
        else:
            start = blob.offset // BLOCK * BLOCK
            segments.append(_Segment(blob.relative_path, start, end - start, [blob]))
    return segments


def _buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of private memory, page-aligned (as ``O_DIRECT`` needs), in huge pages where the
    kernel has them (``MADV_HUGEPAGE``): an ``O_DIRECT`` read into huge pages carries fewer, larger
    segments per request, and goes about twice as fast."""
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype=np.uint8)  # keeps ``memory`` alive; unmapped with the last view


class _ReadAhead:
    """Reads ``segments`` in order on a thread of its own, ahead of their use, into at most
    :data:`READ_BUFFERS` buffers of :data:`READ_WINDOW` and, for segments larger than that (one
    large chunk), at most :data:`LARGE_BUFFERS` buffers of their size: the memory the reader
    before took for one chunk (its bytes and their decoded copy). Buffers are reused from one
    segment to the next and freed with this object. The system calls run without the GIL,
    beside the caller's checksums and copies."""

    def __init__(self, directory: str, segments: list[_Segment]):
        self.directory = directory
        self.segments = segments
        self._pools = {False: queue.SimpleQueue(), True: queue.SimpleQueue()}  # by "larger than the window"
        for large, count in ((False, READ_BUFFERS), (True, LARGE_BUFFERS)):
            for _ in range(count):
                self._pools[large].put(None)  # allocated on first use
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ckpt-read", daemon=True)
        self._thread.start()

    def next(self, segment: _Segment) -> tuple[np.ndarray | None, int, BaseException | None]:
        """(buffer, bytes read into it, the error that stopped the read) of ``segment``, the
        next one in order."""
        done, buffer, got, error = self._ready.get()
        assert done is segment
        return buffer, got, error

    def release(self, segment: _Segment, buffer: np.ndarray | None) -> None:
        """Give ``segment``'s buffer back, to be read into again."""
        self._pools[segment.size > READ_WINDOW].put(buffer)

    def close(self) -> None:
        self._stop = True
        for pool in self._pools.values():
            pool.put(None)  # wakes the thread if it waits for a buffer
        self._thread.join()
        for pool in self._pools.values():  # the buffers go with this object; drop them now
            while not pool.empty():
                pool.get()

    def _run(self) -> None:
        files: dict[str, tuple[int, bool] | BaseException] = {}
        try:
            for segment in self.segments:
                large = segment.size > READ_WINDOW
                buffer = self._pools[large].get()
                if self._stop:
                    return
                error: BaseException | None = None
                got = 0
                try:
                    if buffer is None or len(buffer) < segment.size:
                        buffer = None  # the one too small is freed first
                        buffer = _buffer(segment.size if large else READ_WINDOW)
                    opened = files.get(segment.relative_path)
                    if opened is None:
                        try:
                            opened = files[segment.relative_path] = _open(os.path.join(self.directory, segment.relative_path))
                        except OSError as failed:
                            opened = files[segment.relative_path] = failed
                    if isinstance(opened, BaseException):
                        raise opened
                    got, direct = _read_into(*opened, buffer, segment.start, segment.size)
                    files[segment.relative_path] = (opened[0], direct)
                except BaseException as failed:  # handed to the caller, which raises it in order
                    error = failed
                self._ready.put((segment, buffer, got, error))
        finally:
            for opened in files.values():
                if isinstance(opened, tuple):
                    os.close(opened[0])


def _open(path: str) -> tuple[int, bool]:
    """(descriptor, whether it reads with ``O_DIRECT``): bypassing the page cache where the file
    system allows it (a checkpoint is read once; its bytes would only evict others)."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | direct), True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False


def _read_into(fd: int, direct: bool, buffer: np.ndarray, start: int, size: int) -> tuple[int, bool]:
    """Read [start, start + size) of ``fd`` into ``buffer``; returns (bytes read, short only at
    the end of the file; whether ``fd`` still reads with ``O_DIRECT``)."""
    got = 0
    while got < size:
        try:
            n = os.preadv(fd, [buffer[got:size]], start + got)
        except OSError as error:
            if error.errno != errno.EINVAL or not direct:
                raise
            # O_DIRECT refused for this read (an unaligned remainder, a device with larger
            # blocks): go on through the page cache.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            direct = False
            continue
        if n == 0:
            break
        got += n
    return got, direct


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, on this thread alone where the bytes are copied as they are (same
    dtype, host memory): ``copy_`` splits a large copy over the intra-op threads, which on a
    small machine compete with the read thread and whatever else runs, for more CPU and a slower
    restore. numpy copies on one thread, without the GIL."""
    size = dst.element_size()
    if (dst.dtype == src.dtype and size in _SAME_SIZE_INT and dst.device.type == "cpu" and src.device.type == "cpu"
            and not dst.requires_grad):
        as_int = _SAME_SIZE_INT[size]
        np.copyto(dst.detach().view(as_int).numpy(), src.view(as_int).numpy())
    else:
        dst.copy_(src)
