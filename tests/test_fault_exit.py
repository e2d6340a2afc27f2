"""A rank that dies ends the whole job promptly instead of leaving its peers hanging.

"Promptly" is not a duration here (a loaded machine makes any one of them wrong): the collective
timeout is set far beyond what the test waits (30 minutes against a 5-minute guard), so a job that
ends within the guard was ended because the death was acted upon (the survivor's collective fails
at once, or torchrun stops it), never because a collective timed out."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.launch import PRETRAIN, ROOT, TINY

pytestmark = pytest.mark.slow

GUARD = 300
"""Seconds before the test calls the job hung: a failure guard, not a measurement."""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_one_rank_ends_the_job(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPT_FORCE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PRETRAIN),
           *TINY, "--vocab-size", "1024", "--mock-data", "--pipeline-model-parallel-size", "2",
           "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "100000", "--lr", "1e-3",
           "--log-interval", "1", "--distributed-timeout-minutes", "30"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    workers = []
    try:
        for line in job.stdout:  # wait until training runs
            if line.startswith(" iteration"):
                break
        workers = [p for p in psutil.Process(job.pid).children(recursive=True)
                   if any("pretrain_gpt.py" in part for part in p.cmdline())]
        assert len(workers) == 2, workers
        workers[0].send_signal(signal.SIGKILL)
        try:
            job.communicate(timeout=GUARD)  # until the launcher and every worker (they share its stdout) are gone
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job still runs {GUARD} s after one of its ranks died: its peers hang") from None
        assert job.returncode != 0
        # End of output means every worker closed it, exiting; wait for the exit to complete.
        deadline = time.monotonic() + GUARD
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]
    finally:
        if job.poll() is None:
            job.kill()
        for w in workers:  # a failed test leaves no rank running
            if _alive(w):
                w.kill()
