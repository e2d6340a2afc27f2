"""Fault injection: one seeded trial of each kill on both sides of the checkpoint path: the
trainer killed inside a step and while its flusher is mid-flush; the flusher killed writing a
level's data, committing its metadata, writing an L0 description, and idle. Every resume must
load the newest committed valid checkpoint and replay the losses bit for bit."""

import pytest

from tests.fault_trial_checks import run_first_trial_of_each

pytestmark = pytest.mark.slow

KILLS = ["kill step", "kill trainer-in-flush", "kill L1.write", "kill L2.metadata", "kill describe", "kill flusher.idle"]


def test_one_trial_of_every_kill_side_resumes_correctly(tmp_path):
    run_first_trial_of_each(KILLS, str(tmp_path))
