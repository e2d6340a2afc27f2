"""Fault injection: 20 seeded trials of kills on the checkpoint path and damaged checkpoints.
Every resume must load the newest committed valid checkpoint and replay the losses bit for bit.
``scripts/fault_trials.py --trials 100`` runs more on demand."""

import pytest

from benchmarks import fault_trials

pytestmark = pytest.mark.slow


def test_twenty_fault_trials_all_resume_correctly(tmp_path):
    lines = []
    results = fault_trials.run_trials(20, seed=1, workdir=str(tmp_path), progress=lines.append)
    failed = [f"trial {i + 1}: {r.kind} {r.detail}: {r.message}" for i, r in enumerate(results) if not r.ok]
    assert not failed, "\n".join(failed)
    kinds = {r.kind for r in results}
    assert "kill" in kinds and len(kinds) >= 4, kinds
    assert any(r.loaded and r.loaded < 12 for r in results), "some trials must fall back to an older checkpoint"
