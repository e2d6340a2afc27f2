"""Atomic writes leave either the old or the whole new file, whatever fails."""

import errno
import os

import pytest

from checkpointing.base import durable


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta"
    durable.atomic_write_bytes(str(path), b"old")
    durable.atomic_write_bytes(str(path), b"new content")
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["meta"]


def test_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "meta"
    durable.atomic_write_bytes(str(path), b"old")
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", full_disk)
    with pytest.raises(durable.CheckpointWriteError, match=f"could not write {path}: No space left"):
        durable.atomic_write_bytes(str(path), b"new")
    monkeypatch.setattr(durable.os, "fsync", real_fsync)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["meta"], "the temporary file must be removed"


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    # Injected, because root (as in CI) ignores a read-only directory's permissions.
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(durable.os, "open", denied)
    with pytest.raises(durable.CheckpointWriteError, match="could not write .*meta: Permission denied"):
        durable.atomic_write_bytes(str(tmp_path / "meta"), b"x")
    assert os.listdir(tmp_path) == []


def test_tracker_round_trip_and_damage(tmp_path):
    assert durable.read_tracker(str(tmp_path)) is None
    durable.write_tracker(str(tmp_path), 120)
    assert durable.read_tracker(str(tmp_path)) == 120
    (tmp_path / durable.TRACKER_NAME).write_text("12x")
    with pytest.raises(ValueError, match="should hold an iteration number"):
        durable.read_tracker(str(tmp_path))


def test_a_link_planted_under_the_temporary_name_is_not_followed(tmp_path):
    """Someone who can write the directory plants a symlink where the temporary file will be:
    the write must not go through it (it is replaced, the target untouched)."""
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, tmp_path / f".meta.tmp.{os.getpid()}")
    durable.atomic_write_bytes(str(tmp_path / "meta"), b"new")
    assert target.read_bytes() == b"precious"
    assert (tmp_path / "meta").read_bytes() == b"new" and not (tmp_path / "meta").is_symlink()
