"""The training process's handle on its flusher process: start it, talk to it, know that it lives.

The flusher (``checkpointing.engine.flusher``) is a fresh interpreter started with the socket's other
end; it answers over that socket and keeps its heartbeat, CPU clock and progress in words of the
shared control block. This handle reads the answers without blocking, hands the engine's own
(descriptions written, jobs done) to the engine, and raises :class:`FlusherError` naming the
exit status, the failure or the silence as soon as the flusher is dead, failed or stuck: the
engine calls :meth:`FlusherHandle.check` at every request and while training has to wait.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Callable

from checkpointing.base.errors import FlusherError
from checkpointing.engine import control_block as cb
from checkpointing.engine import protocol
from checkpointing.engine.engine_stats import EngineStats
from checkpointing.engine.flusher_template import PACKAGE_ROOT, FlusherTemplate, exit_status
from checkpointing.engine.protocol import Described, Done, Fatal, FlusherSpec, Ready, Stopped
from checkpointing.storage.host_pool import PoolFiles

_engines_started = itertools.count()
"""Engines this process started: every rank starts them in the same order, so the n-th engine's
flushers meet under the same key prefix."""


def meeting_point(world: int) -> tuple[tuple[str, int] | None, str]:
    """Where this engine's flushers form their group: the job's rendezvous store (None for a
    one-rank job) and a key prefix no other engine of the job uses."""
    store = None
    if world > 1:
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise ValueError("the checkpoint flusher processes meet at the job's rendezvous store: set MASTER_ADDR "
                             "and MASTER_PORT (torchrun and the Slurm script set them)")
        store = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return store, f"gptckpt-flusher/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_engines_started)}/"


class FlusherHandle:
    """This rank's flusher process, started by the constructor, which returns at once: its group
    comes up beside the trainer's work, and what needs it first waits (:meth:`wait_ready`)."""

    def __init__(self, spec: FlusherSpec, block: cb.ControlBlock, timeout: float, stats: EngineStats,
                 on_answer: Callable[[tuple], None], committed_line: Callable[[], str],
                 template: FlusherTemplate | None = None, pool: PoolFiles | None = None):
        """``timeout``: seconds it may go without a heartbeat or, while training waits on it,
        progress; ``stats``: where its start-up, memory and CPU go; ``on_answer``: the engine's
        handler of its answers (``described``, ``done``); ``committed_line``: what the engine
        has committed, for the error messages; ``template``: fork it from this pre-imported
        template (None: start its own interpreter); ``pool``: the engine's L0 files, for the
        template to remove if the trainer dies before a version reaches them."""
        self.rank = spec.rank
        self.block = block
        self.timeout = timeout
        self.stats = stats
        self._on_answer = on_answer
        self._committed_line = committed_line
        self.error: str | None = None
        """The traceback it sent before it ended on an error."""
        self.cpu_final: float | None = None
        """Its CPU time, once it stopped as asked."""
        self._started = time.monotonic()
        self.ready = False
        """Whether its group is up: the engine's first message that needs it waits for it
        (:meth:`wait_ready`), so that its start runs beside the trainer's load and first step."""
        ours, theirs = socket.socketpair()
        if template is not None:  # forked from the pre-imported template: no interpreter start
            self.how_started = "forked from the template"
            self._proc = template.spawn(theirs.fileno(), pool)
        else:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
            env["OMP_NUM_THREADS"] = "1"
            self.how_started = "its own interpreter"
            self._proc = subprocess.Popen([sys.executable, "-m", "checkpointing.engine.flusher", str(theirs.fileno()),
                                           str(os.getpid())], pass_fds=[theirs.fileno()], env=env,
                                          stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        protocol.send(self._conn, spec)

    def wait_ready(self) -> None:
        """Return once its group is up (every rank's flusher has started); raise if it died."""
        if self.ready:
            return
        began = time.monotonic()
        try:
            self._wait_ready()
        finally:
            self.stats.flusher_ready_wait_seconds += time.monotonic() - began

    def _wait_ready(self) -> None:
        while not self.ready:
            try:
                if self._conn.poll(0.05):
                    self._answer(protocol.receive(self._conn, protocol.TO_ENGINE))
                    continue
            except (EOFError, OSError):
                # It ended before it could say why (a traceback before its error handler, a
                # signal): its exit status, and its stderr above (the trainer's), are what is known.
                self._wait_for_exit()
                self.check()
                raise FlusherError(f"rank {self.rank}: the checkpoint flusher (pid {self._proc.pid}) closed its socket "
                                   f"while starting; its output is above this trainer's") from None
            self.check()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def running(self) -> bool:
        return self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL it (one that never got work: nothing of it is kept)."""
        self._proc.kill()

    def _answer(self, message: Ready | Fatal | Stopped | Described | Done) -> None:
        if isinstance(message, Ready):
            self.ready = True
            self.stats.flusher_start_seconds = time.monotonic() - self._started
            self.stats.flusher_rss_bytes = message.resident_bytes
            self.stats.flusher_start_cpu_seconds = message.cpu_seconds
        elif isinstance(message, Fatal):
            self.error = message.traceback
        elif isinstance(message, Stopped):
            self.cpu_final = message.cpu_seconds
        else:
            self._on_answer(message)

    def _cpu_since_ready(self) -> float:
        """Its CPU since it was ready (its start-up, mostly importing torch, apart)."""
        return self.stats.flusher_cpu_since_ready(self.block[cb.CPU_NS] / 1e9)

    def poll(self) -> None:
        """Read every answer it has sent (no wait)."""
        try:
            while self._conn.poll(0):
                self._answer(protocol.receive(self._conn, protocol.TO_ENGINE))
        except (EOFError, OSError):
            if self.cpu_final is not None:
                return  # it said it stopped, then closed its end
            self._wait_for_exit()
            self.check()
            raise FlusherError(f"rank {self.rank}: the checkpoint flusher's socket closed; {self._committed_line()}")
        if self.ready:
            self.stats.flusher_cpu_seconds = self._cpu_since_ready()

    def _wait_for_exit(self) -> None:
        """Its end of the socket closes as it exits: wait for the exit, so that its status can be named."""
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def check(self) -> None:
        """Raise :class:`FlusherError` if it died, failed or stopped answering (while it starts,
        before its first heartbeat: for ``timeout`` seconds since it was started)."""
        code = self._proc.poll()
        if code == 0 and self.cpu_final is not None:
            return  # it stopped as asked
        if code is not None or self.error:
            try:
                while self._conn.poll(0):
                    self._answer(protocol.receive(self._conn, protocol.TO_ENGINE))
            except (EOFError, OSError):
                pass
            what = f"{exit_status(code)}" if code is not None else "failed"
            detail = f"\n{self.error}" if self.error else ""
            raise FlusherError(f"rank {self.rank}: the checkpoint flusher (pid {self._proc.pid}) {what}; training stops "
                               f"rather than go on without checkpoints; {self._committed_line()}{detail}")
        now = time.monotonic_ns()
        beat = self.block[cb.HEARTBEAT_NS]
        since = (now - beat) / 1e9 if beat else time.monotonic() - self._started
        if since > self.timeout:
            self._proc.kill()
            raise FlusherError(f"rank {self.rank}: the checkpoint flusher (pid {self._proc.pid}) has not answered for "
                               f"{since:.0f} s (--ckpt-flusher-timeout {self.timeout:g}); it was killed and "
                               f"training stops; {self._committed_line()}")

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Read its answers until ``done()``; raise if it dies or its work stops moving for
        ``timeout`` seconds (sleeps of 0.1-1 ms: the GIL is free meanwhile)."""
        self.wait_ready()
        pause, last, moved = 1e-4, None, time.monotonic()
        while True:
            self.poll()
            if done():
                return
            self.check()
            marks = (self.block[cb.DESCRIBED], self.block[cb.DONE], self.block[cb.PROGRESS], self.block[cb.FLUSH_ALIVE_NS])
            if marks != last:
                last, moved = marks, time.monotonic()
            elif time.monotonic() - moved > self.timeout:
                self._proc.kill()
                raise FlusherError(f"rank {self.rank}: waited {self.timeout:g} s for the checkpoint flusher "
                                   f"({what}) without progress (--ckpt-flusher-timeout); it was killed and training "
                                   f"stops; {self._committed_line()}")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def send(self, message: protocol.Describe | protocol.FlushJob | protocol.Stop | protocol.Abort) -> None:
        self.wait_ready()
        try:
            protocol.send(self._conn, message)
        except OSError as error:
            self._wait_for_exit()
            self.check()
            raise FlusherError(f"rank {self.rank}: cannot reach the checkpoint flusher ({error}); "
                               f"{self._committed_line()}") from error

    def wait_exit(self, timeout: float) -> int:
        """Its exit status, once it has exited (within ``timeout`` seconds)."""
        return self._proc.wait(timeout=timeout)

    def end(self, timeout: float) -> None:
        """After ``stop`` or ``abort`` was sent (or it died): wait for its exit, killing it after
        ``timeout`` seconds; record its final CPU time; close the socket."""
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.stats.flusher_cpu_seconds = (self.stats.flusher_cpu_since_ready(self.cpu_final)
                                          if self.cpu_final is not None else self._cpu_since_ready())
        self._conn.close()
