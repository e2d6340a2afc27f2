"""The fault-trial tests' one check, shared by ``test_fault_trials.py`` (damages) and
``test_fault_trial_kills.py`` (kills): two files, so that two test workers run them side by side
(``scripts/run_tests.sh``: a file runs whole on one worker)."""

from benchmarks import fault_trials

SEED = 1


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
    results = fault_trials.run_trials(len(indices), seed=SEED, workdir=workdir, indices=indices)
    failed = [f"trial {index} ({kind}): {r.kind} {r.detail}: {r.message}"
              for index, kind, r in zip(indices, kinds, results) if not r.ok]
    assert not failed, "\n".join(failed)
    for kind, r in zip(kinds, results):  # trial_kind names what run_trial did
        assert r.kind == kind.split()[0] and (not kind.startswith("kill ") or f"at {kind[5:]}," in r.detail), \
            (kind, r.kind, r.detail)
    return results
