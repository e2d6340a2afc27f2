"""Fault-injection trials of the checkpoint engine: kill or damage, resume, check.

Each trial trains a tiny GPT (1 process, async engine: L0 every iteration, L1 every 2nd, L2
every 4th) and either kills it at a point on the checkpoint path (the trainer inside an optimizer
step, which writes the snapshot into the pool with zero-copy snapshots, or between iterations,
also while its flusher is in a flush; the flusher process in each level's data write, metadata
write and tracker update, in an L0 description, or idle) or lets it finish and then
damages its checkpoints (flipped bits of data or metadata, truncation, a deleted rank file, a
full disk (injected, or a real small tmpfs) or a read-only directory while saving, lost
node-local data, a second job on the same ``--save``). It then resumes and checks that

- the resume loads the newest checkpoint that is committed and valid on any level (L0 shared
  memory included), never a damaged one;
- every loss after it equals, bit for bit, the uninterrupted run's (both read from the runs'
  ``--metrics-file``).

``scripts/fault_trials.py`` is its command line; ``tests/test_fault_trials.py`` and ``tests/test_fault_trial_kills.py`` run one trial of each damage and each kill.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from benchmarks.processes import PRETRAIN, Launcher, LoggedProcess, run_trainer, trainer_env
from benchmarks.two_nodes import TwoNodeLauncher, run_two_node_trainer
from checkpointing.base import L1, L2, read_tracker
from checkpointing.recovery import l0_entries, level_entries, replica_entries
from checkpointing.storage import host_pool
from trainer.metrics_file import read_metrics_file

TRAIN, RESUME_TO = 12, 14
TRIAL_MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 --seq-length 32 "
               "--max-position-embeddings 32 --hidden-dropout 0 --attention-dropout 0").split()
"""A tiny GPT that trains in seconds on 2 cores, dropout off (a resume must replay its losses)."""
ARGS = TRIAL_MODEL + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
               "--lr", "3e-3", "--lr-decay-iters", "20", "--log-interval", "100", "--async-save", "--save-interval", "1",
               "--ckpt-local-interval", "2", "--ckpt-local-retain-last", "3", "--ckpt-persistent-interval", "4",
               "--save-retain-last", "3"]
KILL_POINTS = ["step", "L1.write", "L1.metadata", "L1.tracker", "L2.write", "L2.metadata", "L2.tracker", "iteration",
               "describe", "flusher.idle", "trainer-in-flush"]
"""Where a SIGKILL lands. The trainer: ``step`` (inside an optimizer step), ``iteration`` (between
iterations), ``trainer-in-flush`` (between iterations while its flusher is in a slowed flush: the
flusher must go with it). The flusher process: ``L*.write``/``L*.metadata``/``L*.tracker`` (in a
flush or its commit), ``describe`` (writing an L0 description), ``flusher.idle`` (after a job,
waiting for the next); the trainer must then stop with an error, and the restart resume."""
DAMAGES = ["flip", "truncate", "delete-rank-file", "delete-metadata", "full-disk", "read-only", "lose-node-local",
           "lose-node", "flip-metadata", "enospc", "second-job"]
"""``lose-node``: a job of two nodes (one rank each, DP2) with peer replicas, killed after an
iteration, node B replaced (its host memory and node-local disk gone): the restart must resume
from host memory (node A's own slots and its replicas of node B's rank), never from L2 alone.
``flip-metadata``: one bit of the newest committed ``.metadata`` flipped. ``enospc``: L1 or L2 on
a real tmpfs too small for every version (where this process may mount one; else the injected
ENOSPC of ``full-disk``): training goes on past the full disk. ``second-job``: a second job on the
same ``--save`` while the first is held at its first flush: it must be refused, and the first
finish as if alone."""
SMALL_FS_MIB = (5, 8, 12)
"""Sizes of the ``enospc`` trials' tmpfs: one version of the trial model's rank is 3.4 MiB."""
PEER_ARGS = ["--ckpt-peer-replicas", "1"]
# A fault on a level's write fires only if that version is flushed; without the hold, a version
# superseded before its flush started is skipped (by design) and the fault is never reached, as
# often as the machine is slow. Held, each request waits until the flushes before it are done.
HOLD = {"GPT_CKPT_HOLD": "request"}


@dataclass
class TrialResult:
    kind: str
    detail: str
    expected: int
    loaded: int | None
    ok: bool
    message: str = ""


def _dirs(base: str) -> tuple[str, str]:
    return os.path.join(base, "l2"), os.path.join(base, "l1")


def _logged(base: str, name: str) -> list[str]:
    """The flags of a run whose every iteration's loss is read back: ``base/<name>.jsonl``."""
    return ["--log-interval", "1", "--metrics-file", os.path.join(base, f"{name}.jsonl")]


def _args(base: str, iters: int, tb: str | None = None) -> list[str]:
    save, local = _dirs(base)
    extra = ["--tensorboard-dir", tb, *_logged(base, "resume")] if tb else []
    return ARGS + ["--train-iters", str(iters), "--save", save, "--load", save, "--ckpt-local-dir", local] + extra


def _losses(base: str, name: str) -> dict[int, float]:
    """``{iteration: lm loss}`` of a run of :func:`_logged`."""
    return {r["iteration"]: r["lm_loss"] for r in read_metrics_file(os.path.join(base, f"{name}.jsonl")).iterations}


def _run(base: str, name: str, args: list[str], env: dict[str, str] | None = None,
         check: bool = True, launcher: Launcher | None = None) -> tuple[int | None, str]:
    """A trial's trainer run, its log ``base/<name>.log``: (exit code, None if it ran past its
    time; its output). ``launcher``: ``benchmarks.processes.Launcher``."""
    rc, timed_out, text = run_trainer(args, os.path.join(base, f"{name}.log"), env, check=check, launcher=launcher)
    return (None if timed_out else rc), text


def expected_resume(base: str) -> int:
    """Newest version committed and valid on any level: what a correct resume must load."""
    save, local = _dirs(base)
    best = max((e.iteration for e in l0_entries(save)), default=0)
    for level, root in ((L1, local), (L2, save)):
        tracker = read_tracker(root) if os.path.isdir(root) else None
        for e in level_entries(level, root, verify=True):
            if e.state == "committed" and (tracker is None or e.iteration <= tracker):
                best = max(best, e.iteration)
    return best


def _damage(base: str, kind: str, rng: random.Random) -> str:
    save, local = _dirs(base)
    committed = [e for root, lv in ((local, L1), (save, L2)) for e in level_entries(lv, root) if e.state == "committed"]
    target = max(committed, key=lambda e: (e.iteration, e.level)) if committed else None
    if rng.random() < 0.7:  # most trials lose L0 too, so that the disk levels are what is tested
        host_pool.remove_segments(save)
    if target is None:
        return "nothing committed to damage"
    data = sorted(glob.glob(os.path.join(target.path, "__*.distcp")))[0]
    if kind == "flip":
        return f"bit flipped at byte {_flip_bit(data, rng)} of {target.level} iteration {target.iteration}"
    if kind == "truncate":
        os.truncate(data, rng.randrange(os.path.getsize(data)))
        return f"{target.level} iteration {target.iteration} truncated"
    if kind == "delete-rank-file":
        os.unlink(data)
        return f"{target.level} iteration {target.iteration} lost its rank file"
    if kind == "delete-metadata":
        os.unlink(os.path.join(target.path, ".metadata"))
        return f"{target.level} iteration {target.iteration} un-committed"
    if kind == "flip-metadata":
        at = _flip_bit(os.path.join(target.path, ".metadata"), rng)
        return f"bit flipped at byte {at} of {target.level} iteration {target.iteration}'s .metadata"
    if kind == "lose-node-local":
        shutil.rmtree(local, ignore_errors=True)
        host_pool.remove_segments(save)
        return "node replaced: L0 and L1 gone"
    raise ValueError(kind)


def _flip_bit(path: str, rng: random.Random) -> int:
    """Flip one random bit of ``path``; returns the byte's offset."""
    with open(path, "r+b") as f:
        at = rng.randrange(os.fstat(f.fileno()).st_size)
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
    return at


def _failure_lines(log: str, limit: int = 2500) -> str:
    """The log's tracebacks and error lines (every process's: a flusher's comes before its
    trainer's), else its end."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback") or "Error:" in line]
    picked = "\n".join(lines[starts[0]:]) if starts else log
    return picked[:limit // 2] + ("\n[...]\n" + picked[-limit // 2:] if len(picked) > limit else picked[limit // 2:])


def _loaded(losses: dict[int, float]) -> int | None:
    """The iteration a resume went on from: the one before the first it trained."""
    return min(losses) - 1 if losses else None


def _copy_run(src: str, dst: str) -> None:
    """A copy of a finished run's levels, its L0 shared-memory pool included (under the new
    job's name), as if that run had happened in ``dst``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tb", "*.log", "*.jsonl"))
    old, new = host_pool.job_tag(_dirs(src)[0]), host_pool.job_tag(_dirs(dst)[0])
    for path in host_pool.list_segments(old):
        shutil.copy(path, path.replace(old, new))


def _node_dirs(base: str) -> list[tuple[str, str]]:
    """(host dir, local dir) of nodes A and B of a ``lose-node`` trial."""
    tag = host_pool.job_tag(base)
    return [(f"/dev/shm/gptckpt-trial-{tag}-node{n}", os.path.join(base, f"node{n}", "l1")) for n in "AB"]


def _two_node_args(base: str, iters: int, metrics: str | None = None) -> tuple[list[str], list[list[str]]]:
    save, _ = _dirs(base)
    extra = _logged(base, metrics) if metrics else []
    args = ARGS + PEER_ARGS + ["--train-iters", str(iters), "--save", save, "--load", save] + extra
    return args, [["--ckpt-host-dir", host, "--ckpt-local-dir", local] for host, local in _node_dirs(base)]


def memory_resume_expected(base: str) -> int:
    """Newest version node A holds for both ranks (rank 0's own slot and its replica of rank 1),
    or the newest valid one on L2 if that is newer."""
    save, _ = _dirs(base)
    host_a = _node_dirs(base)[0][0]
    own = {e.iteration for e in l0_entries(save, host_a)}
    replicas = {e.iteration for e in replica_entries(save, [host_a])}
    best = max(own & replicas, default=0)
    tracker = read_tracker(save) if os.path.isdir(save) else None
    for e in level_entries(L2, save, verify=True):
        if e.state == "committed" and (tracker is None or e.iteration <= tracker):
            best = max(best, e.iteration)
    return best


def run_lose_node(base: str, rng: random.Random, reference: dict[int, float],
                  launcher: TwoNodeLauncher | None = None) -> TrialResult:
    """A ``lose-node`` trial (see :data:`DAMAGES`); ``launcher`` starts its two-node runs
    (``benchmarks.two_nodes.TwoNodeLauncher``; None: torchrun)."""
    kind = "lose-node"
    iteration = rng.randrange(3, TRAIN)
    detail = f"two nodes, replicas on, SIGKILL after iteration {iteration}, node B replaced"
    try:
        args, nodes = _two_node_args(base, TRAIN)
        codes, _ = run_two_node_trainer(args, nodes, base, "train",
                                        {"GPT_CKPT_FAULT": f"iteration:kill:{iteration}", **HOLD}, launcher=launcher)
        if None in codes or codes == [0, 0]:
            return TrialResult(kind, detail, -1, None, False, f"the run to be killed ended with {codes}")
        host_b, local_b = _node_dirs(base)[1]
        shutil.rmtree(host_b, ignore_errors=True)
        shutil.rmtree(local_b, ignore_errors=True)
        expected = memory_resume_expected(base)
        args, nodes = _two_node_args(base, RESUME_TO, "resume")
        codes, text = run_two_node_trainer(args, nodes, base, "resume", launcher=launcher)
        losses = _losses(base, "resume") if os.path.exists(os.path.join(base, "resume.jsonl")) else {}
        loaded = _loaded(losses)
        if codes != [0, 0]:
            return TrialResult(kind, detail, expected, loaded, False, f"resume failed ({codes}): {_failure_lines(text)}")
        if loaded != expected:
            return TrialResult(kind, detail, expected, loaded, False, f"loaded {loaded}, newest in memory is {expected}")
        if "is held in host memory" not in text or "0 bytes read from --save" not in text:
            return TrialResult(kind, detail, expected, loaded, False, "did not resume from host memory")
        wrong = [it for it, v in losses.items() if v != reference[it]]
        if wrong or sorted(losses) != list(range(expected + 1, RESUME_TO + 1)):
            return TrialResult(kind, detail, expected, loaded, False, f"losses differ at {wrong or sorted(losses)}")
        return TrialResult(kind, detail, expected, loaded, True)
    finally:
        for host, _ in _node_dirs(base):
            shutil.rmtree(host, ignore_errors=True)


def trial_kind(seed: int, index: int) -> str:
    """What trial ``index`` of ``seed`` does, from :func:`run_trial`'s first draws: ``lose-node``,
    ``kill <point>`` or a damage of :data:`DAMAGES` (the test picks a trial of each kind by it)."""
    rng = random.Random(seed * 100_003 + index)
    if rng.random() >= 0.5 and rng.choice(DAMAGES) == "lose-node":
        return "lose-node"
    rng = random.Random(seed * 100_003 + index)
    if rng.random() < 0.5:
        return f"kill {rng.choice(KILL_POINTS)}"
    kind = rng.choice(DAMAGES)
    while kind == "lose-node":
        kind = rng.choice(DAMAGES)
    return kind


def run_trial(index: int, seed: int, workdir: str, reference: dict[int, float], finished_run: str,
              two_node_reference=None, launcher: Launcher | None = None,
              two_node_launcher: TwoNodeLauncher | None = None) -> TrialResult:
    """``two_node_reference()``: the uninterrupted two-node run's losses (made on first use).
    ``launcher`` starts the 1-process runs (``benchmarks.processes.Launcher``; the second-job trial's
    held first job starts a fresh interpreter whatever it is), ``two_node_launcher`` the two-node
    trial's (``benchmarks.two_nodes.TwoNodeLauncher``)."""
    rng = random.Random(seed * 100_003 + index)
    base = os.path.join(workdir, f"trial-{index:03d}")
    save, _ = _dirs(base)
    try:
        if rng.random() >= 0.5 and rng.choice(DAMAGES) == "lose-node":
            return run_lose_node(base, rng, two_node_reference(), two_node_launcher)
        rng = random.Random(seed * 100_003 + index)  # the other trials draw as before
        if rng.random() < 0.5:
            kind = "kill"
            point = rng.choice(KILL_POINTS)
            flush_iters = {L1: [2, 4, 6, 8, 10], L2: [4, 8], "flusher": [2, 4, 6, 8, 10]}
            iteration = rng.choice(flush_iters.get(point.split(".")[0], list(range(2, TRAIN))))
            detail = f"SIGKILL at {point}, iteration {iteration}"
            env = {"GPT_CKPT_FAULT": f"{point}:kill:{iteration}"}
            if point.startswith(("L", "flusher")):
                env.update(HOLD)
            if point == "trainer-in-flush":
                env = {"GPT_CKPT_FAULT": f"iteration:kill:{iteration}", "GPT_CKPT_DELAY": "flush:400"}
            rc, _ = _run(base, "train", _args(base, TRAIN), env, check=False, launcher=launcher)
            if rc is None:
                return TrialResult(kind, detail, -1, None, False, "the run to be killed timed out")
            if rc == 0:
                return TrialResult(kind, detail, -1, None, False, "the fault point was never reached")
        else:
            kind = rng.choice(DAMAGES)
            while kind == "lose-node":  # drawn above only where the first draw picked it
                kind = rng.choice(DAMAGES)
            if kind == "enospc":
                level = rng.choice([L1, L2])
                size = rng.choice(SMALL_FS_MIB)
                cannot = _mount_small(_dirs(base)[0 if level == L2 else 1], size)
                if cannot is None:
                    _run(base, "train", _args(base, TRAIN), HOLD, launcher=launcher)
                    detail = f"{level} on a {size} MiB tmpfs during training"
                else:
                    fault = f"{level}.write:fail:{rng.choice([4, 8])}"
                    _run(base, "train", _args(base, TRAIN), {"GPT_CKPT_FAULT": fault, **HOLD}, launcher=launcher)
                    detail = f"{fault} during training (no tmpfs: {cannot})"
            elif kind == "second-job":
                detail = _second_job(base, launcher)
                if detail.startswith("NOT REFUSED"):
                    return TrialResult(kind, detail, -1, None, False, detail)
            elif kind in ("full-disk", "read-only"):
                level = rng.choice([L1, L2])
                fault = f"{level}.write:{'fail' if kind == 'full-disk' else 'readonly'}:{rng.choice([4, 8])}"
                _run(base, "train", _args(base, TRAIN), {"GPT_CKPT_FAULT": fault, **HOLD}, launcher=launcher)
                detail = f"{fault} during training"
                if rng.random() < 0.7:
                    host_pool.remove_segments(save)
            else:
                _copy_run(finished_run, base)
                detail = _damage(base, kind, rng)
        expected = expected_resume(base)
        tb = os.path.join(base, "tb")
        rc, text = _run(base, "resume", _args(base, RESUME_TO, tb), check=False, launcher=launcher)
        losses = _losses(base, "resume")
        loaded = _loaded(losses)
        if rc != 0:
            why = "timed out" if rc is None else f"exit code {rc}"
            return TrialResult(kind, detail, expected, loaded, False, f"resume failed ({why}): {_failure_lines(text)}")
        if loaded != expected:
            return TrialResult(kind, detail, expected, loaded, False, f"loaded {loaded}, newest valid is {expected}")
        wrong = [it for it, v in losses.items() if v != reference[it]]
        if wrong or sorted(losses) != list(range(expected + 1, RESUME_TO + 1)):
            return TrialResult(kind, detail, expected, loaded, False, f"losses differ at {wrong or sorted(losses)}")
        return TrialResult(kind, detail, expected, loaded, True)
    finally:
        host_pool.remove_segments(save)
        for directory in _dirs(base):
            if os.path.ismount(directory):
                subprocess.run(["umount", "-l", directory], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _mount_small(directory: str, mib: int) -> str | None:
    """Mount a ``mib`` MiB tmpfs at ``directory``; None, or why it cannot be done here."""
    os.makedirs(directory, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", directory],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited with {done.returncode}")


def _second_job(base: str, launcher: Launcher | None = None) -> str:
    """The ``second-job`` trial's runs: the first job held at its first flush (a disk gate), a
    second on the same ``--save``, then the first let go; returns the detail."""
    gate = os.path.join(base, "gate")
    first = LoggedProcess([sys.executable, PRETRAIN, *_args(base, TRAIN)],
                          trainer_env({"GPT_CKPT_DISK_GATE": gate, **HOLD}), os.path.join(base, "train.log"), 300)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.proc.poll() is None and not l0_entries(_dirs(base)[0]):
            time.sleep(0.2)  # until its first version is in L0: it holds every lock, and waits at the gate
        rc, second = _run(base, "second", _args(base, TRAIN), check=False, launcher=launcher)
    finally:
        open(gate, "w").close()
        rc_first, timed_out, _, _ = first.finish()
    if rc == 0 or "in use by another job" not in second:
        return f"NOT REFUSED: the second job exited with {rc}: {_failure_lines(second)}"
    if rc_first != 0 or timed_out:
        return f"NOT REFUSED: the first job failed beside the second ({rc_first}, timed out {timed_out})"
    return "a second job on the same --save was refused; the first went on"


def reference_losses(workdir: str, launcher: Launcher | None = None) -> dict[int, float]:
    """The uninterrupted run's loss of every iteration: what every resume must replay."""
    base = os.path.join(workdir, "reference")
    _run(base, "reference", ARGS[: ARGS.index("--async-save")] + ["--train-iters", str(RESUME_TO)]
         + _logged(base, "reference"), launcher=launcher)
    return _losses(base, "reference")


def two_node_reference_losses(workdir: str, launcher: TwoNodeLauncher | None = None) -> dict[int, float]:
    """The uninterrupted two-node (DP2) run's losses, without checkpointing."""
    base = os.path.join(workdir, "reference-two-nodes")
    args = ARGS[: ARGS.index("--async-save")] + ["--train-iters", str(RESUME_TO)] + _logged(base, "reference")
    codes, text = run_two_node_trainer(args, [[], []], base, "reference", launcher=launcher)
    if codes != [0, 0]:
        raise RuntimeError(f"the two-node reference run failed ({codes}):\n{text[-3000:]}")
    return _losses(base, "reference")


class _Once:
    """A value made on first use, by one thread."""

    def __init__(self, make):
        self.make, self.value, self.lock = make, None, threading.Lock()

    def __call__(self):
        with self.lock:
            if self.value is None:
                self.value = self.make()
            return self.value


def run_trials(trials: int, seed: int, workdir: str, progress=print, parallel: int = 2,
               indices: list[int] | None = None, launcher: Launcher | None = None,
               two_node_launcher: TwoNodeLauncher | None = None) -> list[TrialResult]:
    """``parallel`` trials at a time: each launch is mostly single-threaded start-up.
    ``indices``: run these trials of ``seed`` (``trials`` is then their number) instead of the first ``trials``.
    ``launcher``: how the 1-process runs start (``benchmarks.processes.Launcher``; None: fresh interpreters);
    ``two_node_launcher``: how the two-node runs start (``benchmarks.two_nodes.TwoNodeLauncher``; None: torchrun)."""
    indices = list(range(trials)) if indices is None else list(indices)
    trials = len(indices)
    reference = reference_losses(workdir, launcher)
    two_nodes = _Once(lambda: two_node_reference_losses(workdir, two_node_launcher))
    finished = os.path.join(workdir, "finished")
    _run(finished, "train", _args(finished, TRAIN) + ["--ckpt-keep-host-pool"],  # its L0 is copied into trials
         launcher=launcher)
    started = time.perf_counter()
    results: list[TrialResult] = [None] * trials  # type: ignore[list-item]
    try:
        with ThreadPoolExecutor(parallel) as pool:
            futures = {pool.submit(run_trial, index, seed, workdir, reference, finished, two_nodes, launcher,
                                   two_node_launcher): i
                       for i, index in enumerate(indices)}
            for done, future in enumerate(as_completed(futures), 1):
                i, result = futures[future], future.result()
                results[i] = result
                progress(f"  trial {i + 1:3d} ({done}/{trials}, {time.perf_counter() - started:.0f} s): "
                         f"{'ok  ' if result.ok else 'FAIL'} {result.kind:<17} {result.detail}; resumed at "
                         f"{result.loaded} (newest valid {result.expected})" + (f"\n      {result.message}" if result.message else ""))
    finally:
        host_pool.remove_segments(_dirs(finished)[0])
    return results


def summary(results: list[TrialResult]) -> str:
    by_kind = Counter(r.kind for r in results)
    ok = Counter(r.kind for r in results if r.ok)
    lines = ["| fault | trials | passed |", "|---|---|---|"]
    lines += [f"| {kind} | {n} | {ok[kind]} |" for kind, n in sorted(by_kind.items())]
    lines.append(f"| **all** | {len(results)} | {sum(ok.values())} |")
    return "\n".join(lines)
