"""A warm template the flusher processes are forked from, so that no rank pays a second ``import torch``.

A fresh flusher interpreter costs 1.4-2.5 s of wall and ~2 s of CPU per rank (importing torch)
and ~145 MiB of memory of its own. Instead, the training process forks a **template** early, while
it still has a single thread and no process group (:func:`start_template`, called by the trainer
before it joins its job): a copy of its interpreter with torch and the checkpoint layer already
imported, sharing their pages copy-on-write. Each engine then asks the template for a flusher
(:meth:`FlusherTemplate.spawn`), handing it one end of the engine's socket pair; the template
forks the flusher from itself in milliseconds.

Why a template and not a fork of the trainer at engine start: by then the trainer runs OpenMP,
gloo and torch threads, and a fork copies their locks in whatever state they are in. Why not one
flusher per node serving its local ranks: every rank's fences, slots and failure rules are per
flusher today, and a shared one would couple the ranks of a node in the engine's protocol.

The failure rules of a flusher started with its own interpreter hold:

- **Its exit status is the trainer's to read.** The template forks twice and the middle process
  exits at once, so the flusher is re-parented to the trainer, which is a child subreaper
  (``PR_SET_CHILD_SUBREAPER``) while it asks for a flusher: the trainer waits on it as on any
  child (:class:`ForkedProcess`) and names how it ended.
- **It dies with its trainer.** Once re-parented it sets ``PR_SET_PDEATHSIG`` (the flusher's own
  ``_die_with_parent``); a flusher whose trainer died while it was being forked exits at once.
  The template goes with the trainer too (its parent-death signal, or the end of its socket), and
  first removes the pools of its flushers that no version reached: a trainer killed at start-up
  leaves no process and no pool file behind. A pool that holds a version is kept, for recovery.
- **The template dying is named.** A spawn that finds it gone raises :class:`FlusherError` with
  its exit status; flushers already running go on (they are the trainer's children, not its).

Where fork is not safe because the process already runs threads (a test runner's worker, a
launcher that started some), ``start_template(spawn=True)`` starts the template as a fresh
interpreter instead (``python -m checkpointing.engine.flusher_template``): one ``import torch``
for the process, not one per flusher; its flushers are forked from it and re-parented the same
way. Otherwise (not Linux, or threads without ``spawn``) :func:`start_template` returns None and
flushers start with their own interpreter, as before.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from checkpointing.base.errors import FlusherError
from checkpointing.storage.host_pool import PoolFiles

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_TRAINER_DIED = signal.SIGUSR1
"""The template's parent-death signal: it removes the pools that hold no version, then exits."""
_REPARENT_SECONDS = 10.0
"""How long a forked flusher waits to be re-parented to its trainer (the middle process exits at once)."""


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (AttributeError, OSError):
        return False


def process_thread_count() -> int:
    """Threads of this process, the native ones (OpenMP, gloo) included: fork is safe at 1."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def exit_status(returncode: int) -> str:
    """How a process ended, as in "the flusher was killed by SIGKILL"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ForkedProcess:
    """A flusher forked by the template and re-parented to this process: the part of
    ``subprocess.Popen`` the flusher handle uses (``pid``, ``poll``, ``wait``, ``kill``)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by another os.wait() of this process: gone, its status lost
                self.returncode = -signal.SIGKILL  # named as killed, the likeliest end of a flusher that goes unasked
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 1e-3
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"flusher {self.pid}", timeout)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class FlusherTemplate:
    """The template process of this trainer (made by :func:`start_template`)."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()

    def spawn(self, fd: int, pool: PoolFiles) -> ForkedProcess:
        """Fork a flusher that runs ``checkpointing.engine.flusher.main`` over ``fd`` (the flusher's end
        of the engine's socket pair) with this process's environment as it is now (fault points
        and holds are read from it). ``pool``: the engine's L0 files, which the template removes
        if this process dies before any version is described in them."""
        request = pickle.dumps(SpawnRequest(dict(os.environ), pool), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            # A subreaper only while the flusher is forked: other orphans of this process's
            # descendants still go to init (the template answers once the flusher is re-parented)
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            try:
                socket.send_fds(self._sock, [struct.pack("!Q", len(request)) + request], [fd])
                answer = self._sock.recv(8)
            except OSError:
                answer = b""
            finally:
                _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        if len(answer) != 8:
            raise FlusherError(f"the flusher template (pid {self.pid}) {self._ended()}; no checkpoint flusher can "
                               f"start in this process (its output, if any, is above)")
        return ForkedProcess(struct.unpack("!q", answer)[0])

    def _ended(self) -> str:
        try:
            pid, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "is gone"
        return exit_status(os.waitstatus_to_exitcode(status))

    def close(self) -> None:
        """Ask the template to exit (the end of its socket) and reap it."""
        self._sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


@dataclass(frozen=True)
class SpawnRequest:
    """The trainer's request for one flusher (its socket end travels beside, as SCM_RIGHTS)."""

    environ: dict[str, str]
    pool: PoolFiles


_template: FlusherTemplate | None = None


def current_template() -> FlusherTemplate | None:
    """This process's template, if :func:`start_template` made one."""
    return _template if _template is not None and _template_owner == os.getpid() else None


_template_owner = 0


def start_template(spawn: bool = False) -> FlusherTemplate | None:
    """Fork this process's flusher template now (once; later calls return the same one). Call
    it early: after the imports, before any process group, model or thread. Where a fork is not
    safe because another thread runs, ``spawn`` starts the template as a fresh interpreter (one
    interpreter start for the process); without it, and where this is not Linux, returns None:
    flushers then start their own interpreter."""
    global _template, _template_owner
    if current_template() is not None:
        return _template
    if not sys.platform.startswith("linux"):
        return None
    threaded = process_thread_count() != 1
    if threaded and not spawn:
        return None
    if not _prctl(_PR_SET_CHILD_SUBREAPER, 0):  # spawn needs it
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    trainer = os.getpid()
    if threaded:
        pid = _spawn_template(theirs, trainer)
    else:
        import checkpointing.engine.flusher  # noqa: F401 - what every flusher runs, imported once, here

        gc.freeze()  # the heap the template shares is never scanned by its collector (no copy-on-write)
        pid = os.fork()
        if pid == 0:  # the template
            ours.close()
            try:
                _serve(theirs, trainer)
            finally:
                os._exit(0)
        gc.unfreeze()
    theirs.close()
    _template, _template_owner = FlusherTemplate(pid, ours), trainer
    return _template


PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root (above ``checkpointing/``): on a fresh interpreter's path, installed or not."""


def _spawn_template(sock: socket.socket, trainer: int) -> int:
    """Start the template as a fresh interpreter (no fork of this threaded process) over ``sock``."""
    sock.set_inheritable(True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    return os.posix_spawn(sys.executable, [sys.executable, "-m", "checkpointing.engine.flusher_template",
                                           str(sock.fileno()), str(trainer)], env)


def _receive_request(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    head, fds, _flags, _addr = socket.recv_fds(sock, 8, 1)
    if len(head) < 8:
        return None
    size = struct.unpack("!Q", head)[0]
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return body, fds


def _serve(sock: socket.socket, trainer: int) -> None:
    """The template's loop: one flusher per request, until the trainer closes its end or dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a launcher's SIGTERM is for the trainer to answer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pools: list[PoolFiles] = []

    def trainer_died(_signum=None, _frame=None) -> None:
        # A pool no version reached is RAM that no recovery needs: a trainer killed at start-up
        # (or before its first version) leaves none behind. One that holds a version is kept.
        for pool in pools:
            if pool.holds_no_version():
                pool.remove()
        os._exit(0)

    signal.signal(_TRAINER_DIED, trainer_died)
    _prctl(_PR_SET_PDEATHSIG, _TRAINER_DIED)
    if os.getppid() != trainer:
        return
    while True:
        try:
            request = _receive_request(sock)
        except OSError:
            request = None
        if request is None:  # the trainer's end closed: it exits (its signal may come after this)
            trainer_died()
        body, fds = request
        spawn: SpawnRequest = pickle.loads(body)
        pools.append(spawn.pool)
        reader, writer = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.close(reader)
            flusher = os.fork()
            if flusher == 0:
                os.close(writer)
                sock.close()
                _run_flusher(spawn.environ, fds, trainer)
            os.write(writer, struct.pack("!q", flusher))
            os._exit(0)  # the flusher is re-parented to the trainer (its subreaper)
        os.close(writer)
        for fd in fds:
            os.close(fd)
        answer = os.read(reader, 8)
        os.close(reader)
        os.waitpid(middle, 0)
        try:
            sock.sendall(answer if len(answer) == 8 else struct.pack("!q", -1))
        except OSError:
            return


def _run_flusher(env: dict[str, str], fds: list[int], trainer: int) -> None:
    """In the forked flusher: wait to be the trainer's child, take its environment, run."""
    code = 3
    try:
        signal.signal(_TRAINER_DIED, signal.SIG_DFL)
        deadline = time.monotonic() + _REPARENT_SECONDS
        while os.getppid() != trainer:
            if time.monotonic() > deadline:  # the trainer died: it was re-parented elsewhere
                os._exit(3)
            time.sleep(1e-4)
        os.environ.clear()
        os.environ.update(env)
        os.environ["OMP_NUM_THREADS"] = "1"
        from checkpointing.engine import flusher

        code = flusher.main([str(fds[0]), str(trainer)])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then the exit status says it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    """A template started as its own interpreter (:func:`_spawn_template`): import what every
    flusher runs, then serve the trainer that started it."""
    fd, trainer = int(argv[0]), int(argv[1])
    sock = socket.socket(fileno=fd)
    import checkpointing.engine.flusher  # noqa: F401 - forked flushers share it

    gc.freeze()
    _serve(sock, trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
