"""One job at a time on a checkpoint (``checkpointing.base.job_lock``): a lock another job holds is
refused naming its holder, a lock whose holder is gone is taken over, overlapping levels are
refused. A second open file description of the lock file stands in for the other job (``flock``
conflicts between descriptions, in one process too)."""

import fcntl
import json
import os

import pytest

from checkpointing.base import job_lock
from checkpointing.base.config import CheckpointConfig
from checkpointing.base.job_lock import CheckpointInUseError


@pytest.fixture(autouse=True)
def released():
    yield
    job_lock.release_all()


def _other_job_holds(path, pid=4242):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"host": "node7", "pid": pid, "started": "2026-12-07 09:00:00 UTC",
                             "command": "pretrain_gpt.py --save x"}).encode())
    return fd


def test_a_lock_another_job_holds_is_refused_naming_it_then_taken_over_once_it_is_gone(tmp_path):
    path = job_lock.lock_path_for_save(str(tmp_path))
    other = _other_job_holds(path)
    with pytest.raises(CheckpointInUseError) as refused:
        job_lock.hold(path, f"--save {tmp_path}")
    assert f"--save {tmp_path} is in use by another job: pid 4242 on node7, started 2026-12-07 09:00:00 UTC" \
        in str(refused.value)
    os.close(other)  # the other job died: the kernel let go of its lock
    job_lock.hold(path, f"--save {tmp_path}")
    held = json.loads(open(path).read())
    assert held["pid"] == os.getpid() and held["host"]
    job_lock.hold(path, "again")  # this process holds it already: nothing to do
    with pytest.raises(BlockingIOError):  # and another job would be refused now
        fcntl.flock(os.open(path, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_holder_that_does_not_say_who_it_is_is_still_refused(tmp_path):
    path = str(tmp_path / "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"\xff garbage")
    with pytest.raises(CheckpointInUseError, match="its holder did not say who it is"):
        job_lock.hold(path, "x")
    os.close(fd)


def test_a_link_in_place_of_the_lock_file_is_refused(tmp_path):
    path = tmp_path / "lock"
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(CheckpointInUseError, match="cannot open the lock file"):
        job_lock.hold(str(path), "x")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("save, local, host, refused", [
    ("{t}/ckpt", "{t}/ckpt", None, "are the same directory"),
    ("{t}/ckpt", "{t}/ckpt/l1", None, "are inside one another"),
    ("{t}/ckpt/l2", "{t}/ckpt", None, "are inside one another"),
    ("{t}/l2", "{t}/l1", "{t}/l2/shm", "overlap"),
    ("{t}/shm/gptckpt-{uid}/l2", None, "{t}/shm", "overlap"),
    ("{t}/l2", "{t}/l1", "{t}/shm", None),
    ("{t}/shm/l2", "{t}/shm/l1", "{t}/shm", None),  # other directories of the pool's tmpfs
])
def test_levels_that_overlap_are_refused(tmp_path, save, local, host, refused):
    fill = lambda p: p and p.format(t=tmp_path, uid=os.getuid())  # noqa: E731
    kwargs = dict(save=fill(save), async_save=True, host_dir=fill(host) or "/dev/shm")
    if local:
        kwargs.update(local_dir=fill(local), local_interval=2)
    if refused:
        with pytest.raises(ValueError, match=refused):
            CheckpointConfig(**kwargs)
    else:
        CheckpointConfig(**kwargs)


@pytest.mark.parametrize("flag, value", [("flusher_timeout", float("nan")), ("flusher_timeout", float("inf")),
                                         ("host_budget_gb", float("nan"))])
def test_not_a_number_is_refused(flag, value):
    with pytest.raises(ValueError, match="must be"):
        CheckpointConfig(save="/tmp/x", async_save=True, **{flag: value})


@pytest.mark.parametrize("flag", ["load", "host_dir"])
def test_a_file_where_a_directory_belongs_is_named(tmp_path, flag):
    from checkpointing.manager import SaveDirError, claim_checkpoint_dirs

    file = tmp_path / "file"
    file.write_text("x")
    cfg = CheckpointConfig(save=str(tmp_path / "ckpt"), async_save=True, **{flag: str(file)})
    with pytest.raises(SaveDirError, match=f"--{'load' if flag == 'load' else 'ckpt-host-dir'} {file} is not a directory"):
        claim_checkpoint_dirs(cfg, 0)
