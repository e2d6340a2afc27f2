"""Two "nodes" on this machine: two ``torchrun --nnodes 2`` launchers meeting at a c10d rendezvous
on 127.0.0.1, each with arguments of its own (its ``--ckpt-host-dir``, ``--ckpt-local-dir``): what
the peer-replica trials and benchmarks run (``tests/launch.run_two_nodes`` is the tests' twin)."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from typing import Callable

from benchmarks.processes import PRETRAIN, LoggedProcess, job_env

TwoNodeLauncher = Callable[[list[str], list[list[str]], int, dict[str, str], float],
                           "list[tuple[int | None, str]] | None"]
"""Runs ``pretrain_gpt.py`` as a job of two nodes with (args, each node's extra args, processes per
node, environment, timeout in seconds) another way than two torchrun launchers; returns each
node's (exit code, None if it ran past the timeout; its output), node A's first, or None where it
cannot (the job then starts under torchrun). The tests pass one that forks each node's ranks from
a process that has imported torch already (``tests/fault_trial_checks.py``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_node_trainer(args: list[str], node_args: list[list[str]], log_dir: str, name: str,
                         env: dict[str, str] | None = None, nproc_per_node: int = 1,
                         timeout_s: float = 300, launcher: TwoNodeLauncher | None = None) -> tuple[list[int | None], str]:
    """``pretrain_gpt.py args`` as a job of two nodes (node A starts first: it is node 0), one
    OpenMP thread per process. Returns (each launcher's exit code, None if it ran past
    ``timeout_s``; node B's output, which holds the logging rank's lines). Logs go to
    ``log_dir/<name>-node{A,B}.log``. ``launcher``: see :data:`TwoNodeLauncher`."""
    env = job_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GPT_FORCE_CPU": "1", **(env or {})})
    os.makedirs(log_dir, exist_ok=True)
    launched = launcher(args, node_args, nproc_per_node, env, timeout_s) if launcher is not None else None
    if launched is not None:
        for node, (_, text) in zip("AB", launched):
            with open(os.path.join(log_dir, f"{name}-node{node}.log"), "w") as log:
                log.write(text)
        return [code for code, _ in launched], launched[-1][1]
    rdzv = ["--nnodes=2", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex[:8]}"]
    procs = []
    for node, extra in zip("AB", node_args):
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, PRETRAIN, *args, *extra]
        procs.append(LoggedProcess(cmd, env, os.path.join(log_dir, f"{name}-node{node}.log"), timeout_s))
        time.sleep(0.5)
    codes, text = [], ""
    for proc in procs:
        rc, timed_out, _, text = proc.finish()
        codes.append(None if timed_out else rc)
    return codes, text
