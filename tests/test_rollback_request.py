"""The live-rollback request file and answer (``checkpointing.recovery.rollback_request``) and
``scripts/rollback.sh --live`` waiting for the job's answer (no job: the answer is written here)."""

import dataclasses
import json
import os
import socket
import stat
import threading
import time

import pytest

from checkpointing.base import job_lock
from checkpointing.recovery import rollback
from checkpointing.recovery.rollback_request import (
    ANSWER_NAME,
    REQUEST_NAME,
    RequestRefused,
    RollbackAnswer,
    RollbackRequest,
    take_request,
    write_answer,
    write_request,
)


def test_a_request_is_private_taken_once_and_one_at_a_time(tmp_path):
    request = RollbackRequest.new(12, iterations_to_skip=(15, 14, 14), settings=(("--lr", 1e-4),))
    path = write_request(str(tmp_path), request)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(RequestRefused, match="a request is waiting"):
        write_request(str(tmp_path), RollbackRequest.new(3))
    taken = take_request(str(tmp_path))
    assert taken == request and taken.iterations_to_skip == (14, 15)
    assert taken.schedule_changes() == {"lr": 1e-4}
    assert not os.path.exists(path)


@pytest.mark.parametrize("settings, message", [
    ((("--hidden-size", 128),), "--hidden-size cannot change on a live rollback"),
    ((("--lr", "fast"),), "--lr takes a float"),
])
def test_a_setting_a_live_rollback_cannot_change_is_refused_by_name(settings, message):
    with pytest.raises(RequestRefused, match=message):
        RollbackRequest.new(5, settings=settings)


@pytest.mark.parametrize("make, why", [
    (lambda p: (p.write_text('{"step": 5, "id": "x"}'), os.chmod(p, 0o644)), "lets group or others in"),
    (lambda p: os.symlink("/etc/passwd", p), "symbolic link"),
    (lambda p: (p.write_text("[5]"), os.chmod(p, 0o600)), "not a JSON object"),
    (lambda p: (p.write_text('{"step": 5, "id": "x", "run": "rm -rf /"}'), os.chmod(p, 0o600)), "fields no request"),
])
def test_a_request_file_that_is_not_a_private_request_is_refused_and_set_aside(tmp_path, make, why):
    make(tmp_path / REQUEST_NAME)
    with pytest.raises(RequestRefused, match=why) as refused:
        take_request(str(tmp_path))
    assert "set aside" in str(refused.value)
    assert not os.path.lexists(tmp_path / REQUEST_NAME)
    assert [n for n in os.listdir(tmp_path) if n.startswith(REQUEST_NAME + ".refused-")]


def _answer_when_asked(save, done: bool, message: str) -> threading.Thread:
    def answer():
        for _ in range(200):
            if (save / REQUEST_NAME).exists():
                request = take_request(str(save))
                write_answer(str(save), RollbackAnswer(request.id, done, message, request.step, "L0", 0.1))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=answer)
    thread.start()
    return thread


@pytest.fixture
def running_job(tmp_path):
    """``tmp_path`` as the --save of a running job: this process holds its lock, as a job's rank 0 does."""
    lock = job_lock.lock_path_for_save(str(tmp_path))
    job_lock.hold(lock, f"--save {tmp_path}")
    yield tmp_path
    job_lock.drop(lock)


@pytest.mark.parametrize("done, code", [(True, 0), (False, 2)])
def test_rollback_sh_live_waits_for_the_jobs_answer(running_job, tmp_path, capsys, done, code, monkeypatch):
    """...and names the job it asks (its lock's holder), which a job that is not it refuses."""
    asked = []
    monkeypatch.setattr(rollback, "write_request", lambda save, request: asked.append(request) or write_request(save, request))
    thread = _answer_when_asked(tmp_path, done, "the job's words")
    assert rollback.main(["7", "--live", "--save", str(tmp_path), "--timeout", "20"]) == code
    assert asked[0].job == job_lock.own_record(job_lock.lock_path_for_save(str(tmp_path))).key()
    thread.join()
    out = capsys.readouterr()
    assert "the job's words" in (out.out if done else out.err)


def test_rollback_sh_live_without_an_answer_says_so_and_leaves_the_request(running_job, tmp_path, capsys):
    assert rollback.main(["7", "--live", "--save", str(tmp_path), "--timeout", "0.2"]) == 3
    assert "no answer in" in capsys.readouterr().err
    assert json.loads((tmp_path / REQUEST_NAME).read_text())["step"] == 7
    assert not (tmp_path / ANSWER_NAME).exists()


def test_rollback_sh_live_with_no_job_running_is_refused_at_once_and_asks_nothing(tmp_path, capsys):
    """No lock file, or one whose holder ran here and has ended: nothing would answer, and a
    request left behind would roll back the next job on this --save. Refused before any request
    is written, naming the command for a stopped job."""
    assert rollback.main(["7", "--live", "--save", str(tmp_path), "--timeout", "600"]) == 2
    err = capsys.readouterr().err
    assert "no job is running on --save" in err and f"scripts/rollback.sh 7 --save {tmp_path}" in err, err
    dead = job_lock.LockHolder(socket.gethostname(), 2**31 - 1, "2026-12-08 05:00:00 UTC", "pretrain_gpt.py")
    (tmp_path / job_lock.SAVE_LOCK_NAME).write_text(json.dumps(dataclasses.asdict(dead)))
    assert rollback.main(["7", "--live", "--save", str(tmp_path), "--timeout", "600"]) == 2
    assert f"the last one, pid {2**31 - 1} on {socket.gethostname()}" in capsys.readouterr().err
    assert not (tmp_path / REQUEST_NAME).exists()
    lock = str(tmp_path / job_lock.SAVE_LOCK_NAME)
    assert job_lock.has_ended(dead, lock) and not job_lock.has_ended(job_lock.LockHolder.this_process(), lock)
    assert not job_lock.has_ended(dataclasses.replace(dead, host="another-node"), lock)  # cannot tell: wait as before


def test_a_lock_still_held_is_never_taken_for_ended_and_a_planted_lock_file_is_not_read(tmp_path):
    """A record naming a pid that is gone here, while some process still holds the file's lock (a
    job in a container's PID namespace under the same host name): not ended (``/proc/locks``).
    A FIFO, another type or a record with a pid that is not a number: no holder, no hang."""
    lock = str(tmp_path / job_lock.SAVE_LOCK_NAME)
    job_lock.hold(lock, "--save test")
    try:
        with open(lock, "r+") as f:  # what another namespace's job would have written: a pid this one does not have
            f.write(json.dumps(dataclasses.asdict(dataclasses.replace(job_lock.LockHolder.this_process(),
                                                                        pid=2**31 - 1))).ljust(300))
        holder = job_lock.last_holder(lock)
        assert holder.pid == 2**31 - 1 and not job_lock.has_ended(holder, lock)
    finally:
        job_lock.drop(lock)
    os.mkfifo(lock)
    assert job_lock.last_holder(lock) is None  # not blocked on a FIFO nobody writes
    os.unlink(lock)
    (tmp_path / job_lock.SAVE_LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": "1", "started": "x", "command": "y"}))
    assert job_lock.last_holder(lock) is None


def test_a_job_that_ends_while_the_request_waits_has_it_withdrawn(running_job, tmp_path, capsys, monkeypatch):
    looks = []
    monkeypatch.setattr(job_lock, "has_ended", lambda holder, path: looks.append(holder) or len(looks) > 2)
    assert rollback.main(["7", "--live", "--save", str(tmp_path), "--timeout", "600"]) == 3
    err = capsys.readouterr().err
    assert "ended before it took the request; the request was withdrawn" in err, err
    assert not (tmp_path / REQUEST_NAME).exists() and looks[0].pid == os.getpid()


def test_live_only_flags_are_refused_for_a_stopped_job(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rollback.main(["7", "--save", str(tmp_path), "--lr", "1e-4"])
    assert "go with --live" in capsys.readouterr().err


def test_list_shows_each_rollbacks_branch(tmp_path, capsys):
    for it in (20, 25):
        folder = tmp_path / "branches" / "b1" / f"iter_{it:07d}"
        folder.mkdir(parents=True)
        (folder / ".metadata").write_bytes(b"")
    (tmp_path / rollback.ROLLBACK_RECORD).write_text(
        json.dumps({"step": 15, "time": time.time(), "branch": "b1", "live": True}) + "\n")
    assert rollback.main(["--list", "--save", str(tmp_path), "--ckpt-host-dir", str(tmp_path / "shm")]) == 0
    out = capsys.readouterr().out
    assert "back to 15, branch b1 (live): L2 2 version(s) 20-25" in out, out


def test_rollback_sh_takes_the_trainers_flag_names_too(tmp_path, capsys):
    (tmp_path / "local").mkdir()
    assert rollback.main(["--list", "--save", str(tmp_path), "--ckpt-local-dir", str(tmp_path / "local"),
                          "--ckpt-host-dir", str(tmp_path / "shm")]) == 0
    assert f"L1 tracker ({tmp_path / 'local'})" in capsys.readouterr().out


def test_a_job_that_answers_then_ends_at_once_is_heard(running_job, tmp_path, capsys, monkeypatch):
    """The job's answer is read after the look that finds it ended: a job that answers and ends
    between two looks rolled back, and the script says so (exit 0), not that it ended unheard."""
    def answers_then_ends(holder, path):
        if not (tmp_path / REQUEST_NAME).exists():
            return False  # the look before the request: the job runs
        request = take_request(str(tmp_path))  # it takes the request and answers just before the next look
        write_answer(str(tmp_path), RollbackAnswer(request.id, True, "rolled back by the job", request.step, "L0", 0.1))
        return True

    monkeypatch.setattr(job_lock, "has_ended", answers_then_ends)
    assert rollback.main(["7", "--live", "--save", str(tmp_path), "--timeout", "20"]) == 0
    assert "rolled back by the job" in capsys.readouterr().out
