"""One job at a time on a checkpoint: each place a job writes is locked for the job's lifetime.

Two jobs on one ``--save`` (a double launch, or trainers orphaned by a killed launcher) would
share the L0 pool and interleave versions in every level, each committing valid checksums over
the other's state. So, before anything is read, every rank locks what it will write:

- ``--save`` (L2): rank 0 holds ``<save>/.gpt-ckpt.lock``;
- ``--ckpt-local-dir`` (L1): each rank holds ``<local>/.gpt-ckpt-r<rank>.lock`` (one per rank, so
  that ranks of one job sharing a directory, nodes simulated on one machine included, do not
  refuse each other);
- the L0 pool: each rank holds ``<pool dir>/gptckpt-<job tag>-r<rank>.lock`` beside its slots.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on a file opened for the process's lifetime: the kernel
releases it when the holder dies, however it dies, so a lock left by a dead job is simply taken
over. The file says who holds it (host, pid, start time, command) so that a refusal names the
holder. Limits: ``flock`` between nodes works where the shared file system supports it (NFSv4,
Lustre mounted with ``flock``); elsewhere the per-node L1 and L0 locks still catch a second job
on the same node.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass

from checkpointing.base.errors import CheckpointError

SAVE_LOCK_NAME = ".gpt-ckpt.lock"
_HOLDER_BYTES_MAX = 4096


class CheckpointInUseError(CheckpointError):
    """Another live job holds a checkpoint directory or pool this job would write."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int
    started: str
    command: str

    @classmethod
    def this_process(cls) -> "LockHolder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))[:200])

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"

    def key(self) -> str:
        """Names this holder among every job that may ever hold a lock: host, pid, start time."""
        return f"{self.host}:{self.pid}:{self.started}"


_held: dict[str, int] = {}
"""Lock files this process holds, by path: their descriptors stay open until it exits."""
_records: dict[str, LockHolder] = {}
"""What this process wrote in each lock file it holds, by path."""


def lock_path_for_save(save_dir: str) -> str:
    return os.path.join(save_dir, SAVE_LOCK_NAME)


def lock_path_for_local(local_dir: str, rank: int) -> str:
    return os.path.join(local_dir, f".gpt-ckpt-r{rank}.lock")


def hold(path: str, what: str) -> None:
    """Take the lock at ``path`` for this process's lifetime, or raise
    :class:`CheckpointInUseError` naming the holder; taking one this process holds is a no-op.
    ``what``: the place in the user's words (``--save /ckpt``)."""
    path = os.path.abspath(path)
    if path in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise CheckpointInUseError(f"cannot open the lock file {path} of {what} ({error.strerror or error}); "
                                   "fix its permissions, or remove it if it is a link someone placed") from None
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        raise CheckpointInUseError(f"the lock file {path} of {what} belongs to another user; it was not used. "
                                   "Remove it (or ask its owner to), or pass another directory")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(fd)
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CheckpointInUseError(f"cannot lock {path} of {what} ({error.strerror or error})") from None
        raise CheckpointInUseError(
            f"{what} is in use by another job: {holder.describe() if holder else 'its holder did not say who it is'} "
            f"holds {path}. Two jobs on one checkpoint would overwrite each other's versions: stop that job "
            "(or wait for it to end), or pass another directory") from None
    holder = LockHolder.this_process()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
    _held[path] = fd
    _records[path] = holder


def own_record(path: str) -> LockHolder | None:
    """What this process wrote in the lock file at ``path`` when it took it (None: it holds none there)."""
    return _records.get(os.path.abspath(path))


def _read_holder(fd: int) -> LockHolder | None:
    try:
        fields = json.loads(os.pread(fd, _HOLDER_BYTES_MAX, 0) or b"null")
        holder = LockHolder(**fields) if isinstance(fields, dict) else None
    except (OSError, ValueError, TypeError):  # written by something else, or mid-write: the refusal says so
        return None
    if holder is None or not (isinstance(holder.pid, int) and not isinstance(holder.pid, bool) and holder.pid > 0
                              and all(isinstance(v, str) for v in (holder.host, holder.started, holder.command))):
        return None
    return holder


def last_holder(path: str) -> LockHolder | None:
    """Who holds, or last held, the lock at ``path``, as its file says (a job's record stays when
    it ends); None where there is no such file, it is not this user's regular file, or it says
    nothing readable. The file is opened read-only, never through a link, without blocking (a
    FIFO planted there), and not locked: a look must never make a starting job's :func:`hold` fail."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)


def has_ended(holder: LockHolder, path: str) -> bool:
    """Whether the job ``holder`` names, which held the lock at ``path``, has certainly ended: it
    ran on this host, no process has its pid, and no process holds a lock on the file (the
    kernel's ``/proc/locks``: a job in another PID namespace under the same host name, a
    container's, has another pid here). A holder on another host, or a pid now another
    process's, cannot be told apart from a live job here: False."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
        return False
    except ProcessLookupError:
        pass
    except (PermissionError, OverflowError):
        return False
    return not _locked_by_anyone(path)


def _locked_by_anyone(path: str) -> bool:
    """Whether ``/proc/locks`` lists a lock on the file at ``path`` (True where it cannot be read:
    then nothing is certain)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            listed = f.read()
    except OSError:
        return True
    for line in listed.splitlines():  # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF" (device in hex)
        parts = line.split()
        place = next((p for p in parts if p.count(":") == 2), None)
        if place is None:
            continue
        major, minor, inode = place.split(":")
        try:
            if (int(major, 16), int(minor, 16), int(inode)) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
                return True
        except ValueError:
            continue
    return False


def drop(path: str) -> None:
    """Remove a lock file this process holds, then let go of it (a pool freed at a normal end
    leaves no file behind)."""
    fd = _held.pop(os.path.abspath(path), None)
    _records.pop(os.path.abspath(path), None)
    if fd is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def release_all() -> None:
    """Let go of every lock this process holds (a process that ends releases them anyway)."""
    for path, fd in list(_held.items()):
        os.close(fd)
        del _held[path]
        _records.pop(path, None)
