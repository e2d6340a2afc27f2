"""A full disk is a warning, never a crash: every call of the save path that can fail (each
``open``, ``pwrite``, ``ftruncate``, ``fsync``, ``rename``/``replace``, ``mkdir``) is made to fail
with ENOSPC in turn, each one, not a sample. Every such failure ends in ``CheckpointWriteError``,
leaves no uncommitted directory and no temporary file, keeps the previous version committed and
the tracker on it, and the next save succeeds. (A real small filesystem filling up under an
async job: ``tests/test_checkpoint_errors.py``.)"""

import collections
import errno
import os

from checkpointing.base.durable import CheckpointWriteError, read_tracker
from checkpointing.base.levels import Level
from checkpointing.format.commit import save_and_commit
from checkpointing.format.discovery import list_checkpoints
from tests.helpers import SyntheticState

FALLIBLE = ("open", "pwrite", "pwritev", "ftruncate", "fsync", "replace", "rename", "mkdir")


class _Calls:
    """Wraps the ``os`` functions of :data:`FALLIBLE`: counts their calls, and fails call
    ``fail_at`` of ``name`` with ENOSPC."""

    def __init__(self, monkeypatch, fail: tuple[str, int] | None = None):
        self.counts = collections.Counter()
        for name in FALLIBLE:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name), fail))

    def _wrap(self, name, real, fail):
        def call(*args, **kwargs):
            self.counts[name] += 1
            if fail == (name, self.counts[name]):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return call


def _save(root, iteration, state, group):
    return save_and_commit(Level("L2", str(root), None, None), iteration, state.arrays, state.save_pieces,
                           state.capture_small_state(iteration), state.layout, group)


def test_every_failure_point_of_a_save_ends_in_a_write_error_and_leaves_the_level_clean(
        tmp_path, single_process_group, monkeypatch):
    state = SyntheticState(shard_numel=1 << 12)
    _save(tmp_path / "count", 1, state, single_process_group)
    with monkeypatch.context() as probe:  # the calls of a save onto a level that holds a version
        counted = _Calls(probe)
        _save(tmp_path / "count", 2, state, single_process_group)
    points = [(name, k) for name in FALLIBLE for k in range(1, counted.counts[name] + 1)]
    assert len(points) >= 12 and {"open", "pwrite", "fsync", "replace", "mkdir"} <= set(counted.counts), counted.counts
    absorbed = []
    for name, k in points:
        root = tmp_path / f"{name}-{k}"
        _save(root, 1, state, single_process_group)
        with monkeypatch.context() as failing:
            _Calls(failing, fail=(name, k))
            try:
                _save(root, 2, state, single_process_group)
            except CheckpointWriteError as error:
                assert "No space left" in str(error), (name, k, error)
            else:  # a failure the save may absorb: then it went through whole
                absorbed.append((name, k))
        versions = {c.iteration: c.committed for c in list_checkpoints(str(root))}
        leftovers = [p for p in root.rglob("*") if ".tmp." in p.name or "probe" in p.name]
        expected = ({1: True, 2: True}, 2) if (name, k) in absorbed else ({1: True}, 1)
        assert (versions, read_tracker(str(root))) == expected and not leftovers, (name, k, versions, leftovers)
        _save(root, 3, state, single_process_group)  # the next version goes through
        assert read_tracker(str(root)) == 3, (name, k)
    assert absorbed == [("mkdir", 1)]  # os.makedirs(root, exist_ok=True) of a level that exists


def test_retention_reclaims_crashed_saves_and_superseded_copies_below_what_it_keeps(tmp_path, single_process_group):
    """Only with retention; only below the oldest version kept (nothing a run could still use)."""
    from checkpointing.format.commit import apply_retention

    state = SyntheticState(shard_numel=1 << 10)
    root = tmp_path / "l2"
    for iteration in (2, 4, 6):
        _save(root, iteration, state, single_process_group)
    (root / "iter_0000003").mkdir()  # a save that crashed before its commit
    (root / "iter_0000007").mkdir()  # one in progress above the newest
    (root / "iter_0000001.superseded-20261207-090000-11").mkdir()
    (root / "iter_0000005.superseded-20261207-090000-12").mkdir()
    removed = apply_retention(str(root), 2)
    assert sorted(os.path.basename(p) for p in removed) == [
        "iter_0000001.superseded-20261207-090000-11", "iter_0000002", "iter_0000003"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000004", "iter_0000005.superseded-20261207-090000-12", "iter_0000006", "iter_0000007"]
