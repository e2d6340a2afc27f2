"""Files in places other users can write (``/dev/shm``, a shared checkpoint directory).

Anyone on a node can create files in ``/dev/shm``, under names anyone can compute. So the L0
pool lives in a directory of its own user, ``<base>/gptckpt-<uid>/``, created mode 0700; before
an existing one is used (recovery after a crash), it and every file in it are checked with
``lstat``: a directory or regular file, not a symbolic link, owned by this user, not writable by
group or others. Whatever fails is refused with a message naming it and what is wrong, and is
never read. New files are created with ``O_EXCL | O_NOFOLLOW``, so a link planted under their
name is not followed.
"""

from __future__ import annotations

import os
import stat
import tempfile

POOL_DIR_PREFIX = "gptckpt-"


class UnsafePathError(OSError):
    """A file or directory that another user may have planted or can change; never read."""


def problem(path: str, directory: bool = False, private: bool = False) -> str | None:
    """What is wrong with using ``path`` (None: nothing). ``private``: also refuse any access by
    group or others (the pool's directory), not only writes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "it does not exist"
    kind = "directory" if directory else "regular file"
    if stat.S_ISLNK(st.st_mode):
        return f"it is a symbolic link (to {os.readlink(path)!r}), not a {kind}"
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        return f"it is not a {kind}"
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & (0o077 if private else 0o022):
        return (f"its mode {stat.S_IMODE(st.st_mode):04o} lets "
                f"{'group or others in' if private else 'group or others write it'}")
    return None


def check(path: str, directory: bool = False, private: bool = False) -> None:
    """Raise :class:`UnsafePathError` naming ``path`` and what is wrong with it."""
    why = problem(path, directory, private)
    if why is not None:
        raise UnsafePathError(f"refused {path}: {why}; it was not read. Remove it (or fix it) if it is yours")


def pool_dir(base: str) -> tuple[str, str | None]:
    """This user's L0 directory under ``base`` (``/dev/shm``): ``base/gptckpt-<uid>``, created
    0700 if absent, checked if present. Returns (directory, note): when the usual one cannot be
    used (another user made it first, a link, open to others), a fresh private directory for
    this process, and a note saying why (snapshots in it do not carry over to the next run)."""
    path, why = usual_pool_dir(base)
    if why is None:
        return path, None
    fresh = tempfile.mkdtemp(prefix=f"{POOL_DIR_PREFIX}{os.getuid()}-", dir=base)  # 0700, a new name
    return fresh, (f"WARNING: L0 directory {path} refused: {why}; it was not read. This run's host-memory "
                   f"snapshots go to {fresh} instead and will not be found by the next run: remove {path} "
                   "(or ask its owner to)")


def check_pool_parent(base: str) -> None:
    """Raise :class:`UnsafePathError` if another user could rename entries of ``base`` (the L0
    pool's parent, ``--ckpt-host-dir``): owned by someone other than this user or root, or
    writable by others without the sticky bit (``/dev/shm`` is root's, mode 1777: fine). A group
    writable one is allowed: a umask of 002 makes them, and the group is the user's choice."""
    st = os.stat(base)
    if st.st_uid not in (os.getuid(), 0):
        why = f"it is owned by uid {st.st_uid}"
    elif st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        why = f"its mode {stat.S_IMODE(st.st_mode):04o} lets any user rename what is in it (no sticky bit)"
    else:
        return
    raise UnsafePathError(f"refused --ckpt-host-dir {base}: {why}, so another user could move the L0 pool aside "
                          "unnoticed; pass a directory of your own, or one with the sticky bit (chmod +t)")


def usual_pool_dir(base: str) -> tuple[str, str | None]:
    """``base/gptckpt-<uid>``, created 0700 if absent, and why it cannot be used (None: it can).
    Raises :class:`UnsafePathError` where ``base`` itself is unsafe (:func:`check_pool_parent`)."""
    os.makedirs(base, exist_ok=True)
    check_pool_parent(base)
    path = os.path.join(base, f"{POOL_DIR_PREFIX}{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return path, problem(path, directory=True, private=True)


def own_pool_dirs(base: str) -> list[str]:
    """This user's L0 directories under ``base`` that pass the checks (the usual one and any
    fresh one :func:`pool_dir` made)."""
    if not os.path.isdir(base):
        return []
    prefix = f"{POOL_DIR_PREFIX}{os.getuid()}"
    names = sorted(n for n in os.listdir(base) if n == prefix or n.startswith(prefix + "-"))
    return [os.path.join(base, n) for n in names if problem(os.path.join(base, n), directory=True, private=True) is None]


def open_own(path: str, how: str = "w"):
    """Open a report file (metrics, trace) for writing (``how``: ``"w"`` or ``"a"``), never through a
    link someone placed under its name nor into another user's file: raises
    :class:`UnsafePathError` naming it. The umask sets a new file's mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if how == "a" else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        why = problem(path) or error.strerror or str(error)
        raise UnsafePathError(f"refused {path}: {why}; nothing was written to it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise UnsafePathError(f"refused {path}: it is not a regular file of this user's; nothing was written to it")
    return os.fdopen(fd, how)


def create_new(path: str, mode: int = 0o666) -> int:
    """Open a new file for writing (the umask applies to ``mode``); fails if anything, a link
    included, is already there. Returns the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def set_aside(path: str) -> str:
    """Rename an unusable ``path`` out of the way (nothing is deleted); returns the new name."""
    aside = f"{path}.refused-{os.getpid()}"
    os.rename(path, aside)
    return aside
