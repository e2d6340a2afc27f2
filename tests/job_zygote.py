"""A warm launcher for the tests' jobs: each rank forked from a process that has already imported
torch, megatron-core and the trainer, instead of torchrun plus a fresh interpreter per rank.

Why: on this 2-core machine a torchrun launch spends ~2.3 CPU-s on the agent's own start and
~3.8 CPU-s per rank importing torch and megatron-core before the job does anything, and the suite
launches hundreds of ranks. The zygote pays the imports once per pytest session; a rank then
costs a fork.

What a launch keeps of ``torchrun --standalone --nproc-per-node N`` (what the tests rely on):

- each rank's rendezvous variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``...); rank 0
  hosts the store, as in a 1-process job;
- the ranks' stdout and stderr on the launch's, and the script run as ``__main__`` with its
  ``sys.argv`` and ``sys.path[0]``, so an exception ends a rank with its traceback and status 1;
- one rank failing stops the others (SIGTERM, SIGKILL after 30 s), and the launch exits 1 (a
  1-process launch without torchrun exits with the rank's own status, as ``python script`` does);
- a launch is a session of its own: killing its process group takes every process it started.

A job of several "nodes" on this machine is one launch per node (``nnodes``, ``node_rank``, one
master port): each node's ranks get their global ranks, and node 0's first rank hosts the store.

What it does not do: restarts (``--max-restarts``), the c10d rendezvous between launchers, the
agent's store and error files, a launcher to kill. Tests of those run torchrun itself
(``run_pretrain`` with ``torchrun_args``, ``run_two_nodes(torchrun=True)``,
``scripts/fault_trials.py``, ``tests/test_fault_exit.py``). A launch
whose environment differs from the zygote's in a variable read at interpreter or library start
(``PYTHON*``, ``OMP_*``, ``LD_*``...) starts fresh interpreters as before, and
``GPT_TEST_LAUNCHER=torchrun`` makes every launch do so.

Protocol: the zygote listens on a Unix socket in a private directory. A launch connects, sends a
pickled :class:`LaunchRequest` with its stdout and stderr pipes (``SCM_RIGHTS``), and receives the
leader's pid, then its exit status. The zygote forks a **leader** per launch (in a new session),
which forks the ranks, waits for them and reports; the zygote goes with pytest (EOF on its
stdin, whose write end only pytest holds).
"""

from __future__ import annotations

import array
import os
import pickle
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

_STOP_GRACE_SECONDS = 30.0
"""How long ranks have to exit after SIGTERM when another rank failed (torchrun's default)."""

START_UP_PREFIXES = ("PYTHON", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "LD_", "MALLOC_", "TORCH_", "CUDA_")
"""Environment variables read when an interpreter or a library starts: a launch that sets them
otherwise than the zygote was started with cannot be forked from it."""


@dataclass(frozen=True)
class LaunchRequest:
    """One job: ``script`` run as ``__main__`` with ``args`` by ``nproc`` ranks.

    ``torchrun``: the ranks get torchrun's variables and the launch exits 1 if any fails; False
    (one process only) runs it as ``python script`` would, exit status passed through.
    ``nnodes``, ``node_rank``: this launch is node ``node_rank`` of a job of ``nnodes`` launches
    of ``nproc`` ranks each, meeting at ``master_port`` (torchrun only)."""

    script: str
    args: tuple[str, ...]
    nproc: int
    env: dict[str, str]
    cwd: str
    torchrun: bool
    master_port: int = 0
    nnodes: int = 1
    node_rank: int = 0

    def __post_init__(self):
        if not 0 <= self.node_rank < self.nnodes or (self.nnodes > 1 and not self.torchrun):
            raise ValueError(f"node {self.node_rank} of {self.nnodes}: a job of several nodes is a torchrun launch "
                             "per node, node_rank in [0, nnodes)")


@dataclass(frozen=True)
class RankSpec:
    """What a forked rank runs once it has left the zygote's and the leader's frames."""

    script: str
    args: tuple[str, ...]
    env: dict[str, str] = field(repr=False)
    cwd: str


def rank_env(request: LaunchRequest, rank: int) -> dict[str, str]:
    """The environment of local rank ``rank``: the request's, with torchrun's variables where the
    request asks for torchrun (of node ``node_rank`` of ``nnodes``, each with ``nproc`` ranks)."""
    env = dict(request.env)
    if request.torchrun:
        n, world = str(request.nproc), str(request.nproc * request.nnodes)
        global_rank = str(request.node_rank * request.nproc + rank)
        env.update(
            RANK=global_rank, LOCAL_RANK=str(rank), GROUP_RANK=str(request.node_rank), ROLE_RANK=global_rank,
            ROLE_NAME="default", WORLD_SIZE=world, LOCAL_WORLD_SIZE=n, GROUP_WORLD_SIZE=str(request.nnodes),
            ROLE_WORLD_SIZE=world,
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request.master_port),
            TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
            TORCHELASTIC_RUN_ID=f"zygote-{request.master_port}", TORCHELASTIC_USE_AGENT_STORE="False",
        )
    return env


def send_request(conn: socket.socket, request: LaunchRequest, stdout_fd: int, stderr_fd: int) -> None:
    """The request, length first, with the launch's stdout and stderr as ancillary data."""
    data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
    fds = array.array("i", [stdout_fd, stderr_fd])
    conn.sendmsg([struct.pack("!q", len(data))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    conn.sendall(data)


def receive_request(conn: socket.socket) -> tuple[LaunchRequest, list[int]]:
    fds = array.array("i")
    head, ancdata, _flags, _addr = conn.recvmsg(8, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    head += _receive_exactly(conn, 8 - len(head))
    (size,) = struct.unpack("!q", head)
    return pickle.loads(_receive_exactly(conn, size)), list(fds)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("the launch closed its connection mid-request")
        data += chunk
    return bytes(data)


def _send_int(conn: socket.socket, value: int) -> None:
    conn.sendall(struct.pack("!q", value))


def _lead(conn: socket.socket, listener: socket.socket, request: LaunchRequest, out_fd: int, err_fd: int):
    """The leader of one launch (a child of the zygote, in a session of its own). Returns a
    :class:`RankSpec` in each forked rank; in the leader itself it never returns."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    listener.close()
    _send_int(conn, os.getpid())
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.close(out_fd)
    os.close(err_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    ranks: dict[int, int] = {}
    for rank in range(request.nproc):
        pid = os.fork()
        if pid == 0:
            conn.close()
            return RankSpec(request.script, request.args, rank_env(request, rank), request.cwd)
        ranks[pid] = rank

    def forward(signum, _frame):  # torchrun passes SIGTERM/SIGINT on to its workers
        for pid in ranks:
            _kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status, stopping_since = None, None
    while ranks:
        if stopping_since is not None:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() - stopping_since > _STOP_GRACE_SECONDS:
                    for other in ranks:
                        _kill(other, signal.SIGKILL)
                time.sleep(0.05)
                continue
        else:
            pid, wait_status = os.waitpid(-1, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        ranks.pop(pid, None)
        if code != 0 and status is None:
            status = code if not request.torchrun else 1
            stopping_since = time.monotonic()
            for other in ranks:
                _kill(other, signal.SIGTERM)
    _send_int(conn, 0 if status is None else status)
    os._exit(0)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def serve(listener: socket.socket) -> RankSpec:
    """Accept launches until pytest closes this process's stdin (it ends, or stops the zygote);
    returns only in a forked rank.

    Why stdin and not a parent-death signal: Linux sends that signal when the parent *thread*
    ends, and a zygote first wanted by a launch from a worker thread (jobs side by side) was
    killed with the thread, its socket gone for the launches after it."""
    import selectors

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # leaders are reaped by the kernel
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    while True:
        ready = {key.fd for key, _ in selector.select()}
        if sys.stdin.fileno() in ready and not os.read(sys.stdin.fileno(), 1 << 12):
            os._exit(0)  # pytest is gone
        if listener.fileno() not in ready:
            continue
        conn, _ = listener.accept()
        try:
            request, fds = receive_request(conn)
        except (EOFError, OSError, pickle.UnpicklingError, struct.error) as error:
            print(f"job zygote: a launch's request could not be read ({error!r}); it gets no answer", file=sys.stderr)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            selector.close()
            return _lead(conn, listener, request, fds[0], fds[1])
        for fd in fds:
            os.close(fd)
        conn.close()


def run_rank(spec: RankSpec) -> None:
    """Run the script as ``python script args`` would, in this (forked) process."""
    import runpy

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(spec.env)
    os.chdir(spec.cwd)
    sys.argv = [spec.script, *spec.args]
    sys.path[0] = os.path.dirname(os.path.abspath(spec.script))
    runpy.run_path(spec.script, run_name="__main__")


def _warm_imports() -> None:
    """What a rank would import first: torch, megatron-core (its torch.compile deferred, as the
    trainer does), the trainer and the checkpoint layer; and the parser built once."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    import torch  # noqa: F401

    from models.megatron_import import import_megatron_core

    import_megatron_core()
    import checkpointing.engine.flusher  # noqa: F401
    import checkpointing.manager  # noqa: F401
    import trainer.arguments
    import trainer.training  # noqa: F401

    trainer.arguments.build_parser()  # its flags' help, read from the configs' source once (cached), not per rank


def main(socket_path: str) -> RankSpec:
    import gc

    _warm_imports()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SystemExit(f"job zygote: {threads} threads after the imports; forking ranks from it is not safe")
    gc.collect()
    gc.freeze()  # the imported objects stay out of the ranks' collections: fewer pages copied
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    print("ready", flush=True)
    return serve(listener)


if __name__ == "__main__":
    run_rank(main(sys.argv[1]))
