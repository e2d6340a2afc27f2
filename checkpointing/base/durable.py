"""Durable, atomic file operations for the commit protocol (``docs/architecture.md``, "The commit and fence rules").

A reader sees either the old content of a path or the complete new one, never a prefix:
content goes to a temporary name in the same directory, is fsynced, renamed over the final
name, and the directory is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import re

TRACKER_NAME = "latest_checkpointed_iteration.txt"


class CheckpointWriteError(OSError):
    """Writing a checkpoint file failed; the message names the file and the cause."""


def fsync_directory(path: str) -> None:
    """Make the directory entries (creations, renames) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o666, sync_directory: bool = True) -> None:
    """Write ``data`` to ``path`` durably and atomically.

    The temporary file is created new (``O_EXCL | O_NOFOLLOW``: never through a link someone
    placed under its name) with ``mode`` (the umask applies). On any error it is removed and
    ``path`` is left as it was. ``sync_directory`` False: the rename is made durable by the
    caller's next write to the same directory (one directory fsync for both).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:  # left by a killed process of the same pid: remove (unlink follows no link)
            os.unlink(tmp)
            fd = os.open(tmp, flags, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_directory:
            fsync_directory(directory)
    except OSError as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise CheckpointWriteError(error.errno, f"could not write {path}: {error.strerror or error}") from error


def write_tracker(save_dir: str, iteration: int) -> None:
    """Move ``save_dir``'s ``latest_checkpointed_iteration.txt`` to ``iteration`` (atomically)."""
    atomic_write_bytes(os.path.join(save_dir, TRACKER_NAME), f"{iteration}\n".encode())


def read_tracker(save_dir: str) -> int | None:
    """The iteration the tracker names, or None if there is no tracker.

    A tracker that does not hold one integer is reported (it is never half-written by
    :func:`write_tracker`, so it was edited or damaged by something else).
    """
    path = os.path.join(save_dir, TRACKER_NAME)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"{path} should hold an iteration number, found {text[:40]!r}")
    return int(text)


def describe_tracker(save_dir: str) -> str:
    """What the tracker of ``save_dir`` says, for listings: its iteration, ``None``, or that it
    is damaged (never raises)."""
    if not os.path.isdir(save_dir):
        return "None"
    try:
        return str(read_tracker(save_dir))
    except (ValueError, OSError) as error:
        return f"damaged ({error})"
