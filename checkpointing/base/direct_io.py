"""A sequential file writer that bypasses the page cache (``O_DIRECT``) where it can.

Why: a buffered write + fsync costs CPU for every byte (the copy into the page cache, then its
writeback), taken from training; an ``O_DIRECT`` write of the same bytes from the host pool costs
about a tenth of it (``scripts/bench_write_cost.py``; ``results/bench_write_cost_cpu.md``).

``O_DIRECT`` wants the memory address, the file offset and the length of every write aligned to
the device's block (512 B here; 4 KiB covers every common device). Small bytes (zip headers,
pickled objects, the ends of large buffers) go through an aligned staging buffer. A large buffer
is written straight from its memory when it starts at a file offset congruent to its address
modulo :data:`BLOCK`; :meth:`DirectFile.gap_before` tells the caller how many padding bytes to
leave before it so that it does (DCP's format records every blob's offset and length, so gaps
between blobs are allowed and never read).

The staged blocks and the large buffers are queued and written together, up to
:data:`BATCH_BUFFERS` or :data:`BATCH_BYTES` at a time (``pwritev``): each write call costs system
CPU whatever its size, and a rank file of small pieces made ~200 of them. A large buffer's memory
is therefore in use until its batch is written (:attr:`DirectFile.holds_caller_memory`,
:meth:`DirectFile.flush`): the writer reports a piece done only then, since zero-copy snapshots
overwrite a slot behind its flush.

The staging buffer (4 MiB) is taken from a few kept by the process and given back when the file
is closed: a fresh mapping per file cost its page faults and its unmapping at every version,
~7 ms of system CPU per 40 MB rank file of small pieces here (``scripts/bench_startup.py --part
cpu-per-gb``), half of what writing the file cost. Every byte a file gets from it is written
there first, so nothing of an earlier file can reach a later one.

Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the same calls
write through the page cache.

A write rate limit paces the writes (``--ckpt-write-rate-limit``). On a virtual machine even
``O_DIRECT`` writes, which take almost no CPU of the guest, slow training while they run at full
speed (the virtual disk's work competes with the virtual CPUs); a flush
spread over more time interferes less, and the engine then skips the versions superseded
meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import time

from xxhash import xxh3_64, xxh3_64_intdigest

BLOCK = 4096
"""Alignment used for ``O_DIRECT``: a multiple of every common logical block size."""

DIRECT_MIN_BYTES = 256 * 1024
"""Buffers smaller than this are copied through the staging buffer: their gap would cost more
than the copy saves."""

PACE_BYTES = 8 << 20
"""With a rate limit, writes are cut into pieces of this size, each followed by a sleep."""

BATCH_BUFFERS = 64
BATCH_BYTES = 32 << 20
"""Buffers are queued and written together (``pwritev``) up to this many, or this many bytes: on
this VM each write costs ~60 us of system CPU whatever its size, and a flush makes hundreds."""

_ZEROS = bytes(BLOCK)

SPARE_STAGES_KEPT = 4
"""Staging buffers a process keeps for its next files (one per thread writing at once)."""
_spare_stages: list[mmap.mmap] = []
_spare_lock = threading.Lock()


def _take_stage(nbytes: int) -> mmap.mmap:
    """A staging buffer of ``nbytes``: a kept one, or a new private mapping (page-aligned, as
    ``O_DIRECT`` needs; private, so that a forked process never writes into its parent's)."""
    with _spare_lock:
        for index, stage in enumerate(_spare_stages):
            if len(stage) == nbytes:
                return _spare_stages.pop(index)
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _keep_stage(stage: mmap.mmap) -> None:
    with _spare_lock:
        if len(_spare_stages) < SPARE_STAGES_KEPT:
            _spare_stages.append(stage)
            return
    stage.close()


def _forget_stages_after_fork() -> None:
    """A forked process starts with none (its copies of the parent's are not its to reuse) and
    a lock no thread of the parent holds."""
    global _spare_lock
    _spare_stages.clear()
    _spare_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_stages_after_fork)


def gap_for(position: int, header: int, address: int, nbytes: int, direct: bool) -> int:
    """Padding to leave at file offset ``position`` before a blob of ``header`` bytes followed by
    a buffer at memory ``address`` of ``nbytes``, so that the buffer can be written from its
    memory (0 when it cannot: a buffered file, or a buffer too small to be worth it)."""
    if not direct or nbytes < DIRECT_MIN_BYTES:
        return 0
    return (address - header - position) % BLOCK


class DirectFile:
    """Write one file front to back: :meth:`write` copies bytes, :meth:`write_memory` writes a
    large buffer from where it lies. :meth:`close` pads the last block, trims the file to its
    length and fsyncs it. Raises ``OSError`` as the system calls do."""

    def __init__(self, path: str, staging_bytes: int = 4 << 20, rate: float | None = None):
        """``rate``: at most this many bytes per second on average, from the file's opening."""
        if rate is not None and rate <= 0:
            raise ValueError(f"write rate limit must be positive, got {rate}")
        self.path = path
        self.rate = rate
        self._opened = time.perf_counter()
        self._written = 0
        # A new file, never through a link someone placed under its name; the umask sets its
        # mode (a shared file system may need group reads).
        # O_DIRECT is turned on after creation: where the file system refuses it (EINVAL), the
        # file stays buffered instead of being opened twice.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
            self.direct = True
        except OSError as error:
            if error.errno != errno.EINVAL:
                os.close(self.fd)
                raise
            self.direct = False
        self._stage = _take_stage(staging_bytes)
        self._stage_view = memoryview(self._stage)
        self._fill = 0
        """End of the bytes in the staging buffer."""
        self._head = 0
        """Start of the staging buffer's bytes not yet queued (a multiple of BLOCK)."""
        self._stage_at = 0
        """File offset of the staging buffer's byte ``_head`` (a multiple of BLOCK)."""
        self._queue: list[memoryview] = []
        """Buffers to write, in file order, from ``_queue_at``: staged blocks and callers' memory."""
        self._queue_at = 0
        self._queued = 0
        self._borrowed = False
        """The queue holds a caller's memory (``write_memory``), not yet written."""
        self.batches = 0
        """Batches written so far (a caller's sign that the file moved)."""

    @property
    def position(self) -> int:
        """Where the next byte goes."""
        return self._stage_at + self._fill - self._head

    @property
    def holds_caller_memory(self) -> bool:
        """Whether a buffer given to :meth:`write_memory` may not be written yet: its memory must
        not change until :meth:`flush` (or a batch that fills up) writes it."""
        return self._borrowed

    def gap_before(self, header: int, address: int, nbytes: int) -> int:
        """Padding to leave before a blob of ``header`` bytes followed by a buffer at ``address``
        of ``nbytes``, so that the buffer can be written from its memory (0 when it cannot)."""
        return gap_for(self.position, header, address, nbytes, self.direct)

    def write_framed(self, gap: int, head: bytes, payload: memoryview, address: int, tail: bytes) -> int:
        """Append ``gap`` zero bytes (:func:`gap_for`), ``head``, the bytes ``payload`` (a ``B``
        memoryview) that start at memory ``address``, and ``tail``: one call per chunk, where a
        flush writes hundreds. Returns the xxh3-64 of ``head + payload + tail`` (the chunk's
        checksum). A small chunk that fits the staging buffer is copied there in place and hashed
        there, in one call over bytes the copy left in cache."""
        fill = self._fill
        at_head = fill + gap
        at_payload = at_head + len(head)
        at_tail = at_payload + len(payload)
        end = at_tail + len(tail)
        if end < len(self._stage) and (len(payload) < DIRECT_MIN_BYTES or not self.direct):
            stage = self._stage_view
            if gap:
                stage[fill:at_head] = _ZEROS[:gap]
            stage[at_head:at_payload] = head
            stage[at_payload:at_tail] = payload
            stage[at_tail:end] = tail
            self._fill = end
            return xxh3_64_intdigest(stage[at_head:end])
        digest = xxh3_64(head)
        digest.update(payload)
        digest.update(tail)
        if gap:
            self.write(_ZEROS[:gap])
        self.write(head)
        self.write_memory(payload, address)
        self.write(tail)
        return digest.intdigest()

    def write(self, data) -> None:
        """Append ``data`` (any bytes-like object), through the staging buffer."""
        fill = self._fill
        if type(data) is bytes and fill + len(data) < len(self._stage):  # the common case: a small blob that fits
            self._stage_view[fill : fill + len(data)] = data
            self._fill = fill + len(data)
            return
        data = memoryview(data).cast("B")
        if fill + len(data) < len(self._stage):
            self._stage_view[fill : fill + len(data)] = data
            self._fill = fill + len(data)
            return
        while data:
            n = min(len(data), len(self._stage) - self._fill)
            self._stage_view[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == len(self._stage):
                self._write_stage()

    def write_memory(self, data: memoryview, address: int) -> None:
        """Append the buffer ``data`` that starts at memory ``address``. When ``address`` is
        congruent to :attr:`position` modulo :data:`BLOCK` (see :meth:`gap_before`), all its
        whole blocks go to the file straight from memory: queued, and written with the buffers
        around them (see :attr:`holds_caller_memory`)."""
        data = data.cast("B")
        if not self.direct or len(data) < DIRECT_MIN_BYTES or (address - self.position) % BLOCK:
            self.write(data)
            return
        head = -self.position % BLOCK
        self.write(data[:head])
        self._queue_stage()  # the staged bytes now end on a block boundary: queued whole
        body = (len(data) - head) // BLOCK * BLOCK
        self._enqueue(data[head : head + body], body, borrowed=True)
        self.write(data[head + body :])

    def flush(self) -> None:
        """Write what is queued (staged blocks, callers' memory); what is staged stays."""
        if not self._queue:
            return
        buffers, offset = self._queue, self._queue_at
        self._queue, self._queued, self._borrowed = [], 0, False
        self.batches += 1
        if self.rate or len(buffers) == 1:
            for buffer in buffers:
                self._pwrite(buffer, offset)
                offset += len(buffer)
        else:
            self._pwritev(buffers, offset)

    def _enqueue(self, buffer: memoryview, advance: int, borrowed: bool) -> None:
        """Queue ``buffer`` at the file offset of the staging buffer's unqueued bytes, which then
        start ``advance`` bytes later (less than ``len(buffer)`` for a padded last block)."""
        if not self._queue:
            self._queue_at = self._stage_at
        self._queue.append(buffer)
        self._queued += len(buffer)
        self._stage_at += advance
        self._borrowed = self._borrowed or borrowed
        if len(self._queue) >= BATCH_BUFFERS or self._queued >= BATCH_BYTES:
            self.flush()

    def _queue_stage(self, final: bool = False) -> None:
        """Queue the staged blocks not yet queued (with ``final``, all staged bytes, the last
        block padded with zeros)."""
        length = self._fill - self._head
        if not final:
            length = length // BLOCK * BLOCK
        if length == 0:
            return
        padded = -(-length // BLOCK) * BLOCK
        start = self._head
        self._stage_view[start + length : start + padded] = _ZEROS[: padded - length]
        self._head = start + length
        self._enqueue(self._stage_view[start : start + padded], length, borrowed=False)

    def _write_stage(self, final: bool = False) -> None:
        """Write the staging buffer's whole blocks (with ``final``, all of it, the last block
        padded) and what is queued before them, and keep the rest at the buffer's front."""
        self._queue_stage(final)
        self.flush()
        rest = self._fill - self._head
        self._stage_view[:rest] = self._stage_view[self._head : self._fill]
        self._fill, self._head = rest, 0

    def _go_buffered(self, error: OSError) -> None:
        """After a write refused with ``error``: where the file was opened with O_DIRECT and the
        file system refuses it (EINVAL), go on buffered (the caller retries); else raise ``error``."""
        if error.errno != errno.EINVAL or not self.direct:
            raise error
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _pwritev(self, buffers: list[memoryview], offset: int) -> None:
        while buffers:
            try:
                written = os.pwritev(self.fd, buffers, offset)
            except OSError as error:
                self._go_buffered(error)
                continue
            offset += written
            self._written += written
            while buffers and written >= len(buffers[0]):
                written -= len(buffers[0])
                buffers = buffers[1:]
            if written:
                buffers = [buffers[0][written:], *buffers[1:]]

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while data:
            if self.rate:
                ahead = self._opened + self._written / self.rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            try:
                written = os.pwrite(self.fd, data[:PACE_BYTES] if self.rate else data, offset)
            except OSError as error:
                self._go_buffered(error)
                continue
            data, offset = data[written:], offset + written
            self._written += written

    def close(self) -> None:
        """Write what is staged, trim the padding of the last block and fsync."""
        if self.fd < 0:
            return
        written = False
        try:
            end = self.position
            self._write_stage(final=True)
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
            if not self.direct:  # durable now: keep checkpoint bytes out of the page cache
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            written = True
        finally:
            self.abort(keep_stage=written)

    def abort(self, keep_stage: bool = False) -> None:
        """Close without writing what is staged (after an error). Never raises but for the
        ``close`` of the descriptor: an error on the way out must not hide the one that led here.
        ``keep_stage``: give the staging buffer back for the next file (:meth:`close`; after an
        error a slice of it may still be referenced, by the traceback: it is dropped instead)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._queue, self._queued, self._borrowed = [], 0, False  # what was not written never will be
            try:
                self._stage_view.release()
                if keep_stage:
                    _keep_stage(self._stage)
                else:
                    self._stage.close()
                self._stage_view = self._stage = None
            except BufferError:
                # A slice of the staging buffer is still referenced (by the traceback of the write
                # that failed): the buffer is freed with the last reference instead.
                self._stage_view = self._stage = None
            os.close(fd)

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
