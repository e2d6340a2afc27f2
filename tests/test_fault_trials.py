"""Fault injection: 20 seeded trials of kills on the checkpoint path and damaged checkpoints.
Every resume must load the newest committed valid checkpoint and replay the losses bit for bit.
``scripts/fault_trials.py --trials 100`` runs more on demand."""

import importlib.util
import sys

import pytest

from tests.launch import ROOT

pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("fault_trials", ROOT / "scripts" / "fault_trials.py")
fault_trials = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fault_trials  # dataclasses look their module up there
spec.loader.exec_module(fault_trials)


def test_twenty_fault_trials_all_resume_correctly(tmp_path):
    lines = []
    results = fault_trials.run_trials(20, seed=1, workdir=str(tmp_path), progress=lines.append)
    failed = [line for line, r in zip(lines, results) if not r.ok]
    assert not failed, "\n".join(failed)
    kinds = {r.kind for r in results}
    assert "kill" in kinds and len(kinds) >= 4, kinds
    assert any(r.loaded and r.loaded < 12 for r in results), "some trials must fall back to an older checkpoint"
