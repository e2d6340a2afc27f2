"""Fault injection: one seeded trial of every damage and of kills on both sides (trainer and
flusher) of the checkpoint path. Every resume must load the newest committed valid checkpoint and
replay the losses bit for bit. ``scripts/fault_trials.py --trials 100`` runs the random sweep
(every kill point) on demand."""

import pytest

from benchmarks import fault_trials

pytestmark = pytest.mark.slow

SEED = 1
KINDS = [*(d for d in fault_trials.DAMAGES),
         # the trainer killed inside a step and while its flusher is mid-flush; the flusher killed
         # writing a level's data, committing its metadata, writing an L0 description, and idle
         "kill step", "kill trainer-in-flush", "kill L1.write", "kill L2.metadata", "kill describe", "kill flusher.idle"]


def _first_trial_of_each(kinds: list[str]) -> list[int]:
    found: dict[str, int] = {}
    for index in range(2000):
        found.setdefault(fault_trials.trial_kind(SEED, index), index)
        if all(k in found for k in kinds):
            return [found[k] for k in kinds]
    raise AssertionError(f"seed {SEED} draws no trial of {[k for k in kinds if k not in found]}")


def test_one_trial_of_every_damage_and_kill_side_resumes_correctly(tmp_path):
    indices = _first_trial_of_each(KINDS)
    results = fault_trials.run_trials(len(indices), seed=SEED, workdir=str(tmp_path), indices=indices)
    failed = [f"trial {index} ({kind}): {r.kind} {r.detail}: {r.message}"
              for index, kind, r in zip(indices, KINDS, results) if not r.ok]
    assert not failed, "\n".join(failed)
    for kind, r in zip(KINDS, results):  # trial_kind names what run_trial did
        assert r.kind == kind.split()[0] and (not kind.startswith("kill ") or f"at {kind[5:]}," in r.detail), \
            (kind, r.kind, r.detail)
    assert any(r.loaded and r.loaded < 12 for r in results), "some trials must fall back to an older checkpoint"
