"""The pytest side of :mod:`tests.job_zygote`: start the zygote once per session, launch jobs
through it, and read their output and exit status as ``subprocess.run`` would."""

from __future__ import annotations

import atexit
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from tests.helpers import free_port, job_env
from tests.job_zygote import START_UP_PREFIXES, LaunchRequest, send_request

ROOT = Path(__file__).resolve().parent.parent
_READY_SECONDS = 120.0


class _Zygote:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="gpt-test-zygote-")  # 0700: the socket is this user's
        self.socket_path = os.path.join(self.dir, "zygote.sock")
        self.env = job_env()
        log = open(os.path.join(self.dir, "zygote.log"), "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.job_zygote", self.socket_path], cwd=ROOT,
                                        env=self.env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE)
        # Its stdin stays open, never written: the zygote ends when it reads EOF there (pytest
        # gone, or stop()), whichever thread started it (tests/job_zygote.serve says why).
        log.close()
        atexit.register(self.stop)
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(_READY_SECONDS) or self.process.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the job zygote did not start: {self.log()}")
        selector.close()

    def log(self) -> str:
        try:
            return Path(self.dir, "zygote.log").read_text(errors="replace")[-3000:]
        except OSError as error:
            return f"(no log: {error})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.stdin.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def forks(self, env: dict[str, str]) -> bool:
        """Whether a job with ``env`` may be forked from the zygote: every start-up variable as the zygote's."""
        keys = {k for k in (*env, *self.env) if k.startswith(START_UP_PREFIXES)}
        return all(env.get(k) == self.env.get(k) for k in keys)


_zygote: _Zygote | None = None
_zygote_failed = False
_zygote_lock = threading.Lock()
"""Launches from several threads at once (jobs side by side) start one zygote, not one each."""


def zygote_for(env: dict[str, str]) -> _Zygote | None:
    """The session's zygote, started on first use; None where this launch needs fresh interpreters
    (``GPT_TEST_LAUNCHER=torchrun``, a start-up variable set otherwise, a zygote that cannot start)."""
    global _zygote, _zygote_failed
    with _zygote_lock:
        if os.environ.get("GPT_TEST_LAUNCHER") == "torchrun" or _zygote_failed:
            return None
        if _zygote is None or not _zygote.alive():
            try:
                _zygote = _Zygote()
            except (RuntimeError, OSError) as error:
                _zygote_failed = True
                warnings.warn(f"jobs start fresh interpreters: {error}")
                return None
        return _zygote if _zygote.forks(env) else None


def run_forked(zygote: _Zygote, script: Path | str, args: list[str], nproc: int, env: dict[str, str],
               timeout: float, torchrun: bool, cwd: Path | str = ROOT, nnodes: int = 1, node_rank: int = 0,
               master_port: int | None = None) -> subprocess.CompletedProcess:
    """Run ``script args`` as ``nproc`` ranks forked from ``zygote``; a timeout kills the launch's
    whole process group and raises ``subprocess.TimeoutExpired`` with what it printed.
    ``nnodes``, ``node_rank``, ``master_port``: this launch is one node of a job of several, each
    launched with the same port (see :class:`tests.job_zygote.LaunchRequest`)."""
    where = f" node {node_rank}/{nnodes}" if nnodes > 1 else ""
    cmd = [f"(zygote{' torchrun' if torchrun else ''} x{nproc}{where})", str(script), *args]
    port = master_port if master_port is not None else free_port() if torchrun else 0
    request = LaunchRequest(str(script), tuple(args), nproc, env, str(cwd), torchrun, port, nnodes, node_rank)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(zygote.socket_path)
        send_request(conn, request, out_w, err_w)
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks = {out_r: [], err_r: []}
    answer = bytearray()
    selector = selectors.DefaultSelector()
    for fd in (out_r, err_r, conn.fileno()):
        selector.register(fd, selectors.EVENT_READ)
    deadline, timed_out = time.monotonic() + timeout, False
    open_fds = 3
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0 and not timed_out:
                timed_out = True
                if len(answer) >= 8:
                    _kill_group(struct.unpack("!q", answer[:8])[0])
                deadline = time.monotonic() + 30  # what is left to read after the kill
                continue
            if left <= 0:
                break
            for key, _ in selector.select(left):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    open_fds -= 1
                elif key.fd == conn.fileno():
                    answer += data
                else:
                    chunks[key.fd].append(data)
    finally:
        selector.close()
        conn.close()
        os.close(out_r)
        os.close(err_r)
    out = b"".join(chunks[out_r]).decode(errors="backslashreplace")
    err = b"".join(chunks[err_r]).decode(errors="backslashreplace")
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, out, err)
    # The leader sends its pid, then the launch's status; no status: the leader itself was killed.
    returncode = struct.unpack("!q", answer[8:16])[0] if len(answer) >= 16 else -signal.SIGKILL
    return subprocess.CompletedProcess(cmd, returncode, out, err)


def run_forked_nodes(zygote: _Zygote, script: Path | str, args: list[str], node_args: list[list[str]], nproc: int,
                     env: dict[str, str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Run ``script args`` as a job of ``len(node_args)`` nodes of ``nproc`` ranks each, every node
    a launch of its own from ``zygote`` with its ``node_args`` appended, side by side, meeting at
    one master port. Returns each node's result, node 0's first; a node that ran past ``timeout``
    (its processes killed) has ``returncode`` None and what it printed."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()

    def launch(node: int) -> subprocess.CompletedProcess:
        try:
            return run_forked(zygote, script, [*args, *node_args[node]], nproc, env, timeout, True,
                              nnodes=len(node_args), node_rank=node, master_port=port)
        except subprocess.TimeoutExpired as expired:
            return subprocess.CompletedProcess(expired.cmd, None, expired.stdout or "", expired.stderr or "")

    with ThreadPoolExecutor(len(node_args)) as pool:
        return list(pool.map(launch, range(len(node_args))))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
