"""Fault injection: one seeded trial of every damage of the checkpoint path (the kills are in
``test_fault_trial_kills.py``). Every resume must load the newest committed valid checkpoint and
replay the losses bit for bit. ``scripts/fault_trials.py --trials 100`` runs the random sweep
(every kill point) on demand."""

import pytest

from benchmarks import fault_trials
from tests.fault_trial_checks import run_first_trial_of_each

pytestmark = pytest.mark.slow


def test_one_trial_of_every_damage_resumes_correctly(tmp_path):
    results = run_first_trial_of_each(list(fault_trials.DAMAGES), str(tmp_path))
    assert any(r.loaded and r.loaded < 12 for r in results), "some trials must fall back to an older checkpoint"
