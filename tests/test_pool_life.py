"""The L0 pool is RAM on a shared node: freed at a normal end once the final version is on every
level, kept when asked (``--ckpt-keep-host-pool``) and after SIGTERM (the job resumes from it);
``rollback.sh --list`` shows one line per version held, its ranks counted."""

import os
import signal
import subprocess
import sys

import pytest

from checkpointing.storage import host_pool
from tests.helpers import job_env
from tests.launch import PRETRAIN, ROOT, TINY, run_pretrain

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--lr", "3e-3", "--log-interval", "1", "--async-save", "--save-interval", "2", "--lr-decay-iters", "8"]


def _pool(save) -> list[str]:
    return host_pool.list_segments(host_pool.job_tag(str(save)))


def test_freed_at_a_normal_end_kept_when_asked_and_listed_once_per_version(tmp_path):
    save = tmp_path / "ckpt"
    try:
        proc = run_pretrain(ARGS + ["--train-iters", "4", "--save", str(save)], nproc=2)
        assert "L0 pool freed" in proc.stdout and _pool(save) == [], proc.stdout[-1500:]
        proc = run_pretrain(ARGS + ["--train-iters", "6", "--save", str(save), "--load", str(save),
                                    "--save-interval", "1", "--ckpt-keep-host-pool"], nproc=2)
        assert "L0 pool kept in shared memory (--ckpt-keep-host-pool)" in proc.stdout
        assert len([p for p in _pool(save) if p.endswith(".meta")]) == 4  # versions 5 and 6 on both ranks
        env = dict(os.environ, PYTHON=sys.executable)
        listed = subprocess.run([str(ROOT / "scripts" / "rollback.sh"), "--list", "--save", str(save)],
                                capture_output=True, text=True, env=env, timeout=120, check=True).stdout
        l0 = [line for line in listed.splitlines() if line.startswith("L0 ")]
        assert len(l0) == 2 and all("2 rank slot(s): ranks 0-1" in line and "-r*-s*" in line for line in l0), listed
    finally:
        host_pool.remove_segments(str(save))


def test_kept_after_sigterm(tmp_path):
    save = tmp_path / "ckpt"
    env = job_env()
    cmd = [sys.executable, str(PRETRAIN), *ARGS, "--train-iters", "100000", "--save", str(save)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(" iteration        3/"):
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(lines) + proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-2000:]
        assert "SIGTERM received" in out and "L0 pool kept in shared memory (stopped by a signal)" in out, out[-2000:]
        assert [p for p in _pool(save) if p.endswith(".meta")], "the final version stays in shared memory"
    finally:
        if proc.poll() is None:
            proc.kill()
        host_pool.remove_segments(str(save))
