"""Helpers for end-to-end tests: launch pretrain_gpt.py under torchrun, roll a job back, read its TensorBoard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import JOB_VARIABLES, free_port, job_env  # noqa: F401  (tests/conftest.py imports free_port from here)
from tests.zygote_launch import run_forked, run_forked_nodes, zygote_for

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "scripts" / "pretrain_gpt.py"
ROLLBACK = ROOT / "scripts" / "rollback.sh"
RESHARD_WORKER = ROOT / "tests" / "workers" / "reshard_worker.py"
LOGITS_WORKER = ROOT / "tests" / "workers" / "gpt_logits_worker.py"

# A tiny model that 8 gloo processes train in seconds on 2 cores (dropout off: the parallel
# runs must see the same function as the single-process one).
TINY = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "256", "--seq-length", "32", "--max-position-embeddings", "32",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]


def run_pretrain(args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True,
                 env: dict[str, str] | None = None, script: Path = PRETRAIN,
                 torchrun_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node nproc <script> args`` (pretrain_gpt.py by default).

    One process without torchrun options runs as plain ``python``: the trainer makes it a
    1-process job, and the launch is seconds faster. Without ``torchrun_args`` the ranks are
    forked from the session's warm zygote (tests/job_zygote.py says what it keeps of torchrun);
    ``GPT_TEST_LAUNCHER=torchrun`` starts fresh interpreters under torchrun instead."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPT_FORCE_CPU="1", **(env or {}))
    plain = nproc == 1 and not torchrun_args
    if plain:
        env = job_env(**{k: v for k, v in env.items() if k not in JOB_VARIABLES})
    zygote = None if torchrun_args else zygote_for(env)
    if zygote is not None:  # ranks forked from a warm interpreter (tests/job_zygote.py)
        proc = run_forked(zygote, script, args, nproc, env, timeout, torchrun=not plain)
    else:
        if plain:
            cmd = [sys.executable, str(script), *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   *torchrun_args, str(script), *args]
        proc = _run_group(cmd, timeout, env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pretrain_gpt.py failed ({proc.returncode}) with {nproc} processes: {' '.join(args)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def _run_group(cmd: list[str], timeout: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout the whole job goes (torchrun and
    its workers), not only torchrun, whose workers would otherwise go on, hung, beside later tests."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def reshard_and_step(full_pt: str | Path, out_dir: str | Path, args: list[str], nproc: int, reference: float,
                     iteration: int, rel_tol: float) -> None:
    """Load a checkpoint into the layout of ``args`` with ``tests/workers/reshard_worker.py``
    (it checks every loaded piece against ``full_pt``, the checkpoint as stock PyTorch reads it),
    with and without the distributed optimizer; each one's training step must be ``iteration``
    with a loss within ``rel_tol`` of ``reference``."""
    import math

    run_pretrain([str(full_pt), str(out_dir), *args], nproc=nproc, timeout=600, script=RESHARD_WORKER)
    for distributed in (0, 1):
        step, loss = (Path(out_dir) / f"loss-{distributed}.txt").read_text().split()
        assert int(step) == iteration
        assert math.isclose(float(loss), reference, rel_tol=rel_tol), (distributed, float(loss), reference)


_WITHOUT_TORCH = ("import sys; from checkpointing.recovery.rollback import main; rc = main(sys.argv[1:]); "
                  "sys.exit(rc if 'torch' not in sys.modules else 'rollback.sh imported torch')")


def rollback(*args, check: bool = True, without_torch: bool = False) -> subprocess.CompletedProcess:
    """Run ``scripts/rollback.sh args`` (with this Python); fails on a non-zero exit unless not ``check``.
    ``without_torch``: its command (``python -m checkpointing.recovery.rollback``) in an interpreter
    that exits 1 if it imported torch (listing and rolling back disk levels need none)."""
    env = dict(os.environ, PYTHON=sys.executable)
    command = [sys.executable, "-c", _WITHOUT_TORCH] if without_torch else [str(ROLLBACK)]
    proc = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def read_scalars(logdir: str | Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of one scalar tag, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        raise AssertionError(f"no scalar {tag!r} in {logdir}; tags: {acc.Tags()['scalars']}")
    return {event.step: event.value for event in acc.Scalars(tag)}


def run_two_nodes(args: list[str], node_args: list[list[str]], nproc_per_node: int = 2, timeout: int = 300,
                  env: dict[str, str] | None = None, torchrun: bool = False) -> list[subprocess.CompletedProcess]:
    """Launch ``pretrain_gpt.py`` as a job of two "nodes" on this machine, each with its own extra
    ``node_args`` (its node-local directories). Returns both nodes' results, node A's first.

    By default each node's ranks are forked from the session's warm zygote (one launch per node,
    node A node 0: tests/job_zygote.py). With ``torchrun`` (or where the zygote cannot fork this
    environment) two ``torchrun --nnodes 2`` launchers meet at a c10d rendezvous on 127.0.0.1,
    node A started first: c10d orders nodes by (host, launcher pid), so it is node 0 in every run
    (node-local files are named after global ranks)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GPT_FORCE_CPU="1", **(env or {}))
    zygote = None if torchrun else zygote_for(env)
    if zygote is not None:
        return _two_forked_nodes(zygote, args, node_args, nproc_per_node, timeout, env)
    import time
    import uuid

    rdzv = ["--nnodes=2", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex[:8]}"]
    procs = []
    for extra in node_args:
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, str(PRETRAIN), *args, *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
        time.sleep(0.5)
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def _two_forked_nodes(zygote, args: list[str], node_args: list[list[str]], nproc_per_node: int, timeout: int,
                      env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """:func:`run_two_nodes` from the zygote; a node that runs past ``timeout`` raises once both have returned."""
    results = run_forked_nodes(zygote, PRETRAIN, args, node_args, nproc_per_node, env, timeout)
    for result in results:
        if result.returncode is None:
            raise subprocess.TimeoutExpired(result.args, timeout, result.stdout, result.stderr)
    return results


def script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<name> args`` with this Python; fail the test with its output unless it succeeds."""
    env, path = job_env(), ROOT / "scripts" / name
    zygote = zygote_for(env)
    if zygote is not None:
        proc = run_forked(zygote, path, list(args), 1, env, timeout, torchrun=False)
    else:
        proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{name} {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def our_outputs(d: Path, flags: list[str], load: str, ids: list[int], new_tokens: int = 20) -> dict:
    """Our model loaded from ``load`` in one process (tests/workers/gpt_logits_worker.py): the
    logits of ``ids``, ``new_tokens`` greedy tokens, and the loss of the first training step on
    the data."""
    import torch

    out = d / "ours.pt"
    run_pretrain([str(out), ",".join(map(str, ids)), str(new_tokens), *flags, "--train-iters", "1", "--load", load,
                  "--finetune"], script=LOGITS_WORKER)  # forked from the zygote, as the trainer's ranks are
    return dict(torch.load(out), ids=ids)


def transformers_outputs(model, ids: list[int], new_tokens: int = 20) -> tuple:
    """(logits of ``ids``, ``new_tokens`` greedy ids) of a ``transformers`` causal LM, as
    :func:`our_outputs` computes ours (no end-of-sequence stop)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    model.generation_config.eos_token_id = None  # generate all the tokens, as our greedy loop does
    generated = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return logits, generated[0, len(ids):].tolist()
