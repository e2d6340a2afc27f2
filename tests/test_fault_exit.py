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


JOB = [*TINY, "--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
       "--lr", "1e-3", "--log-interval", "1", "--seed", "11", "--async-save", "--save-interval", "1",
       "--ckpt-snapshot", "zero-copy", "--lr-decay-iters", "1000"]  # one schedule whatever --train-iters


def _losses(path) -> dict[int, float]:
    from trainer.metrics_file import read_metrics_file

    return {r["iteration"]: r["lm_loss"] for r in read_metrics_file(str(path)).iterations}


def test_a_second_job_on_one_save_is_refused_naming_the_first_which_goes_on_bit_for_bit(tmp_path):
    """Job A trains on ``--save``; job B with the same ``--save`` is refused within its start-up,
    naming A's process, before it opens anything; A's losses equal a run alone (its optimizer
    state lives in the L0 pool, which B would have shared)."""
    from tests.helpers import job_env
    from tests.launch import run_pretrain

    save = tmp_path / "ckpt"
    first = subprocess.Popen([sys.executable, str(PRETRAIN), *JOB, "--train-iters", "100000", "--save", str(save),
                              "--metrics-file", str(tmp_path / "a.jsonl")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env(), cwd=ROOT)
    try:
        for line in first.stdout:
            if line.startswith(" iteration"):
                break
        second = run_pretrain([*JOB, "--train-iters", "5", "--save", str(save), "--metrics-file",
                               str(tmp_path / "b.jsonl")], check=False, timeout=GUARD)
        assert second.returncode != 0
        assert f"--save {save} is in use by another job: pid {first.pid} on " in second.stderr, second.stderr[-3000:]
        assert not (tmp_path / "b.jsonl").exists() or not _losses(tmp_path / "b.jsonl")
        for line in first.stdout:  # A goes on past the refusal
            if line.startswith(" iteration") and int(line.split()[1].split("/")[0]) >= 12:
                break
        first.send_signal(signal.SIGTERM)  # stops after the iteration, drains its checkpoints
        first.communicate(timeout=GUARD)
        assert first.returncode == 0
    finally:
        if first.poll() is None:
            first.kill()
    alone = tmp_path / "alone"
    run_pretrain([*JOB, "--train-iters", "12", "--save", str(alone / "ckpt"), "--metrics-file",
                  str(alone / "m.jsonl")])
    a, reference = _losses(tmp_path / "a.jsonl"), _losses(alone / "m.jsonl")
    assert len(reference) == 12 and all(a[i] == reference[i] for i in reference), (a, reference)


def test_killing_the_launcher_leaves_no_trainer_and_the_relaunch_takes_the_checkpoint(tmp_path):
    """torchrun's agent SIGKILLed: its trainers die with it (parent-death signal) instead of
    training on as orphans that hold the checkpoint, and the same command resumes."""
    from tests.launch import run_pretrain

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPT_FORCE_CPU="1")
    save = tmp_path / "ckpt"
    args = [*JOB, "--tensor-model-parallel-size", "2", "--save", str(save), "--load", str(save)]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(PRETRAIN), *args, "--train-iters", "100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                           start_new_session=True)
    workers = []
    try:
        for line in job.stdout:
            if line.startswith(" iteration"):
                break
        trainers = psutil.Process(job.pid).children()  # the flushers and their template are the trainers' children
        workers = trainers + [p for t in trainers for p in t.children(recursive=True)]
        assert len(trainers) == 2, trainers
        job.kill()  # the agent only
        job.wait()
        deadline = time.monotonic() + GUARD
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "trainers (or their flushers) outlived their launcher"
    finally:
        for w in workers:
            if _alive(w):
                w.kill()
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc = run_pretrain([*args, "--train-iters", "3"], nproc=2, check=False, timeout=GUARD)
    assert proc.returncode == 0 and "in use by another job" not in proc.stderr, proc.stderr[-3000:]
