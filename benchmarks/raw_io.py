"""What the disk gives a program that does nothing with the bytes: the raw reads and writes the
CPU bench sets the engine's save and load against, and dropping the page cache before a read."""

from __future__ import annotations

import os
import shutil
import time


def raw_bandwidth(directory: str, nbytes: int) -> tuple[float, float]:
    """(write+fsync GB/s, cold read GB/s) of one file of ``nbytes``, 64 MiB writes."""
    import numpy as np

    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    path = os.path.join(directory, "raw.bin")
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    write = nbytes / (time.perf_counter() - started) / 1e9
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    read = nbytes / (time.perf_counter() - started) / 1e9
    os.unlink(path)
    return write, read


def drop_cache(directory: str) -> None:
    """Evict every file under ``directory`` from the page cache: the next read is a cold one."""
    for dirpath, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


RAW_READ_BYTES = 64 << 20
"""Bytes per read of the raw sequential reads (``dd iflag=direct bs=64M``)."""


def raw_direct_read(paths: list[str], huge_pages: bool) -> tuple[int, float]:
    """(bytes, seconds) of reading ``paths`` front to back with ``O_DIRECT`` in 64 MiB reads into
    one reused buffer: what the disk gives a reader that does nothing with the bytes. With
    ``huge_pages`` the buffer is in 2 MiB pages (``MADV_HUGEPAGE``), as the reader's are: on the
    2-core VM an ``O_DIRECT`` read into them went about 2.5 times as fast as into 4 KiB pages,
    which is what ``dd``'s buffer is in."""
    import mmap

    buffer = mmap.mmap(-1, RAW_READ_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    else:
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    buffer.write(bytes(RAW_READ_BYTES))  # fault it in before the clock starts
    total = 0
    started = time.perf_counter()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # a file system without O_DIRECT: through the page cache (dropped before)
            fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                n = os.preadv(fd, [buffer], offset)
                offset += n
                if n < RAW_READ_BYTES:
                    break
        finally:
            os.close(fd)
        total += offset
    seconds = time.perf_counter() - started
    buffer.close()
    return total, seconds


def dd_read(paths: list[str]) -> tuple[int, float] | None:
    """(bytes, seconds) of ``dd iflag=direct bs=64M`` over ``paths`` (None without ``dd``)."""
    import subprocess

    if shutil.which("dd") is None:
        return None
    started = time.perf_counter()
    for path in paths:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=64M"], check=True,
                       capture_output=True)
    return sum(os.path.getsize(p) for p in paths), time.perf_counter() - started
