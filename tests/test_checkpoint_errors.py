"""Every error case of a checkpoint load or save: the message names what to fix, nothing is lost."""

import os
import shutil
import subprocess

import pytest

from checkpointing.format.discovery import list_checkpoints
from tests.launch import TINY, run_pretrain

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
               "--lr", "1e-3", "--log-interval", "5", "--lr-decay-iters", "20"]
DATA = "__0_0.distcp"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """15 iterations, a save every 5, the newest 2 kept: iterations 10 and 15 remain."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    run_pretrain(ARGS + ["--train-iters", "15", "--save", str(root), "--save-interval", "5", "--save-retain-last", "2"])
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    return copy


def resume(ckpt, *extra, check=True, env=None):
    return run_pretrain(ARGS + ["--train-iters", "16", "--load", str(ckpt), *extra], check=check, env=env)


def test_retention_keeps_the_newest_committed(saved):
    assert [(c.iteration, c.committed) for c in list_checkpoints(str(saved))] == [(10, True), (15, True)]
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == "15"


def test_flipped_byte_falls_back_to_previous_with_a_warning(ckpt):
    path = ckpt / "iter_0000015" / DATA
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    proc = resume(ckpt)
    assert "WARNING: checkpoint" in proc.stdout and "checksum mismatch" in proc.stdout
    assert str(path) in proc.stdout and "written by rank 0" in proc.stdout and "tensor " in proc.stdout
    assert "loaded iteration 10" in proc.stdout
    assert path.exists(), "a damaged checkpoint is reported, never deleted"


def test_truncated_file_with_ckpt_step_is_an_error_naming_the_file(ckpt):
    path = ckpt / "iter_0000015" / DATA
    os.truncate(path, path.stat().st_size // 3)
    proc = resume(ckpt, "--ckpt-step", "15", check=False)
    assert proc.returncode != 0
    assert "--ckpt-step 15 cannot be loaded" in proc.stderr and f"truncated data file {path}" in proc.stderr


def test_missing_rank_file_falls_back(ckpt):
    (ckpt / "iter_0000015" / DATA).unlink()
    proc = resume(ckpt)
    assert "missing data file" in proc.stdout and "loaded iteration 10" in proc.stdout


def test_every_checkpoint_damaged_is_an_error_and_nothing_is_deleted(ckpt):
    for it in (10, 15):
        (ckpt / f"iter_{it:07d}" / DATA).write_bytes(b"garbage")
    proc = resume(ckpt, check=False)
    assert proc.returncode != 0 and "nothing was deleted" in proc.stderr
    assert len(list_checkpoints(str(ckpt))) == 2


def test_uncommitted_directory_is_never_loaded(ckpt):
    os.unlink(ckpt / "iter_0000015" / ".metadata")
    proc = resume(ckpt)
    assert "no committed metadata" in proc.stdout and "loaded iteration 10" in proc.stdout


@pytest.mark.parametrize("flags, expected", [
    (["--hidden-size", "32", "--ffn-hidden-size", "128"], "has shape (1024, 64), this model (1024, 32)"),
    (["--hidden-size", "32", "--ffn-hidden-size", "128"], "--hidden-size: 64 saved, 32 now"),
    (["--num-layers", "2"], "no place for"),
])
def test_another_model_is_refused_with_tensor_and_shapes(saved, flags, expected):
    proc = run_pretrain(ARGS + flags + ["--train-iters", "16", "--load", str(saved)], check=False)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
    assert "WARNING" not in proc.stdout, "a model mismatch never falls back"


def test_an_empty_load_dir_or_a_missing_one_that_is_the_save_dir_starts_from_scratch(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_pretrain(ARGS + ["--train-iters", "1", "--load", str(tmp_path / "empty")])
    assert "training starts from scratch" in proc.stdout
    fresh = str(tmp_path / "fresh")
    proc = run_pretrain(ARGS + ["--train-iters", "1", "--load", fresh, "--save", fresh])
    assert "training starts from scratch" in proc.stdout


def test_a_misspelled_load_dir_is_refused_in_one_line(tmp_path):
    """A --load that does not exist (and is not this run's --save) is a typo, not a fresh start."""
    proc = run_pretrain(ARGS + ["--train-iters", "1", "--load", str(tmp_path / "ckpts-typo")], check=False)
    assert proc.returncode != 0 and "does not exist; check the path" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) <= 5 and "Traceback" not in proc.stderr, proc.stderr


def test_unwritable_save_dir_fails_at_startup(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = run_pretrain(ARGS + ["--train-iters", "1000", "--save", str(tmp_path / "file" / "ckpt")], check=False)
    assert proc.returncode != 0
    assert f"checkpoint directory {tmp_path / 'file' / 'ckpt'} is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr  # one line that says what to do
    assert "iteration " not in proc.stdout, "no training before the error"


@pytest.mark.parametrize("point", ["write", "metadata"])
def test_failed_save_commits_nothing_and_keeps_the_previous(ckpt, point):
    proc = run_pretrain(ARGS + ["--train-iters", "20", "--load", str(ckpt), "--save", str(ckpt), "--save-interval", "20"],
                        check=False, env={"GPT_CKPT_FAULT": f"sync.{point}:fail"})
    assert proc.returncode != 0 and "nothing was committed" in proc.stderr and "No space left" in proc.stderr
    assert f"its partial directory {ckpt / 'iter_0000020'} was removed" in proc.stderr
    state = {c.iteration: c.committed for c in list_checkpoints(str(ckpt))}
    assert state == {10: True, 15: True}
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "15"


@pytest.fixture
def small_filesystem(tmp_path):
    """A 5 MiB tmpfs at ``tmp_path / "small"``: room for one version of the tiny model (3.4 MiB),
    not two; skips where mounting needs privileges this test lacks."""
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'}): "
                    "the real full-disk run needs root or a user namespace")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_an_async_job_on_a_full_disk_warns_goes_on_and_resumes(tmp_path, small_filesystem):
    """A real full disk: training goes on with a warning per failed version, no partial
    directory is left, and the next launch resumes (from L0, the newest version)."""
    args = [*TINY, "--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "1e-3", "--lr-decay-iters", "22", "--log-interval", "5", "--async-save", "--save-interval", "1",
            "--save", str(small_filesystem / "ckpt"), "--load", str(small_filesystem / "ckpt")]
    # Held: every version is flushed (none superseded however loaded the machine), so version 2
    # is the first to meet the full disk.
    proc = run_pretrain([*args, "--train-iters", "20", "--save-retain-last", "1"], check=False,
                        env={"GPT_CKPT_HOLD": "request"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "WARNING: L2 flush of iteration 2 " in out and "No space left on device" in out, out[-3000:]
    assert "was removed); the version stays in L0 (host memory), training goes on" in out
    assert " iteration       20/" in proc.stdout
    assert sorted(p.name for p in (small_filesystem / "ckpt").iterdir()) == [
        ".gpt-ckpt.lock", "iter_0000001", "latest_checkpointed_iteration.txt"]  # no partial version left
    resumed = run_pretrain([*args, "--train-iters", "22", "--save-retain-last", "1"], check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "loaded iteration 20 from L0" in resumed.stdout, resumed.stdout[-2000:]
    assert " iteration       22/" in resumed.stdout


def test_a_ckpt_step_no_level_holds_names_the_nearest_held_steps(saved):
    proc = resume(saved, "--ckpt-step", "12", check=False)
    assert proc.returncode != 0 and "--ckpt-step 12: no committed checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert "nearest held: [10, 15]" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 5 and "Traceback" not in proc.stderr, proc.stderr
