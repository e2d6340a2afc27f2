"""The fault-trial tests' one check, shared by ``test_fault_trials.py`` (damages) and
``test_fault_trial_kills.py`` (kills): two files, so that two test workers run them side by side
(``scripts/run_tests.sh``: a file runs whole on one worker). Their 1-process runs are forked from
the session's job zygote (``tests/job_zygote.py``), which has imported torch and megatron-core once:
a trial makes two to four runs, each of which otherwise spends ~4 CPU-s starting. The two-node
runs of ``lose-node`` are forked too, one launch per node (``scripts/fault_trials.py`` runs them
under torchrun, as ``tests/test_two_nodes.py`` does)."""

import signal
import subprocess

from benchmarks import fault_trials
from benchmarks.processes import PRETRAIN
from tests.zygote_launch import run_forked, run_forked_nodes, zygote_for

SEED = 1


def zygote_launcher(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, bool, str] | None:
    """``benchmarks.processes.Launcher``: ``pretrain_gpt.py args`` forked from the zygote, as a
    1-process job (None where the zygote cannot fork this environment)."""
    zygote = zygote_for(env)
    if zygote is None:
        return None
    try:
        done = run_forked(zygote, PRETRAIN, args, 1, env, timeout, torchrun=False)
    except subprocess.TimeoutExpired as expired:
        return -signal.SIGKILL, True, f"{expired.stdout or ''}{expired.stderr or ''}"
    return done.returncode, False, done.stdout + done.stderr


def zygote_two_node_launcher(args: list[str], node_args: list[list[str]], nproc_per_node: int, env: dict[str, str],
                             timeout: float) -> list[tuple[int | None, str]] | None:
    """``benchmarks.two_nodes.TwoNodeLauncher``: each node's ranks forked from the zygote (None
    where the zygote cannot fork this environment)."""
    zygote = zygote_for(env)
    if zygote is None:
        return None
    return [(done.returncode, done.stdout + done.stderr)
            for done in run_forked_nodes(zygote, PRETRAIN, args, node_args, nproc_per_node, env, timeout)]


def _first_trial_of_each(kinds: list[str]) -> list[int]:
    found: dict[str, int] = {}
    for index in range(2000):
        found.setdefault(fault_trials.trial_kind(SEED, index), index)
        if all(k in found for k in kinds):
            return [found[k] for k in kinds]
    raise AssertionError(f"seed {SEED} draws no trial of {[k for k in kinds if k not in found]}")


def run_first_trial_of_each(kinds: list[str], workdir: str) -> list[fault_trials.TrialResult]:
    """Run seed :data:`SEED`'s first trial of each kind; assert each resumed correctly and is the
    kind asked for. Returns the results."""
    indices = _first_trial_of_each(kinds)
    results = fault_trials.run_trials(len(indices), seed=SEED, workdir=workdir, indices=indices,
                                      launcher=zygote_launcher, two_node_launcher=zygote_two_node_launcher)
    failed = [f"trial {index} ({kind}): {r.kind} {r.detail}: {r.message}"
              for index, kind, r in zip(indices, kinds, results) if not r.ok]
    assert not failed, "\n".join(failed)
    for kind, r in zip(kinds, results):  # trial_kind names what run_trial did
        assert r.kind == kind.split()[0] and (not kind.startswith("kill ") or f"at {kind[5:]}," in r.detail), \
            (kind, r.kind, r.detail)
    return results
