"""Two "nodes" on this machine: two ``torchrun --nnodes 2`` launchers meeting at a c10d rendezvous
on 127.0.0.1, each with arguments of its own (its ``--ckpt-host-dir``, ``--ckpt-local-dir``): what
the peer-replica trials and benchmarks run (``tests/launch.run_two_nodes`` is the tests' twin)."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid

from benchmarks.processes import PRETRAIN, LoggedProcess, job_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_node_trainer(args: list[str], node_args: list[list[str]], log_dir: str, name: str,
                         env: dict[str, str] | None = None, nproc_per_node: int = 1,
                         timeout_s: float = 300) -> tuple[list[int | None], str]:
    """``pretrain_gpt.py args`` as a job of two nodes (node A starts first: it is node 0), one
    OpenMP thread per process. Returns (each launcher's exit code, None if it ran past
    ``timeout_s``; node B's output, which holds the logging rank's lines). Logs go to
    ``log_dir/<name>-node{A,B}.log``."""
    env = job_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GPT_FORCE_CPU": "1", **(env or {})})
    rdzv = ["--nnodes=2", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex[:8]}"]
    os.makedirs(log_dir, exist_ok=True)
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
