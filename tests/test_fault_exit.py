"""A rank that dies ends the whole job promptly instead of leaving its peers hanging."""

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.launch import PRETRAIN, ROOT, TINY


def test_sigkill_of_one_rank_ends_the_job(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPT_FORCE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PRETRAIN),
           *TINY, "--vocab-size", "1024", "--mock-data", "--pipeline-model-parallel-size", "2",
           "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "100000", "--lr", "1e-3",
           "--log-interval", "1", "--distributed-timeout-minutes", "1"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        for line in job.stdout:  # wait until training runs
            if line.startswith(" iteration"):
                break
        workers = [p for p in psutil.Process(job.pid).children(recursive=True)
                   if any("pretrain_gpt.py" in part for part in p.cmdline())]
        assert len(workers) == 2, workers
        workers[0].send_signal(signal.SIGKILL)
        started = time.monotonic()
        job.stdout.read()
        assert job.wait(timeout=120) != 0
        assert time.monotonic() - started < 90
        time.sleep(1)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        if job.poll() is None:
            job.kill()
