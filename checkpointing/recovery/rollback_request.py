"""Asking a running job to roll back: the request file and the job's answer.

``scripts/rollback.sh STEP --live --save DIR`` writes ``DIR/rollback-request.json`` (the job's
``--save``); the job's rank 0 looks for it between iterations (``trainer.live_rollback``), takes
it, and writes ``DIR/rollback-answer.json`` once the rollback is done or refused; the script
waits for the answer that carries its request's id.

The checkpoint directory may be shared with other users of the file system, so both files are
private: created mode 0600 under a temporary name, renamed into place, and read only when they
pass the pool's checks (a regular file of this user's, not a link, no access by group or others;
``checkpointing.base.private_files``). A request that fails them, or that is not a request, is set
aside (renamed, nothing deleted), answered with the reason where it can be, and training goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from checkpointing.base import job_lock, private_files

REQUEST_NAME = "rollback-request.json"
ANSWER_NAME = "rollback-answer.json"
MAX_BYTES = 65536
"""A request or answer is a few hundred bytes; anything longer is not one."""

LIVE_SETTINGS = {
    "--lr": ("lr", float),
    "--min-lr": ("min_lr", float),
    "--lr-warmup-iters": ("warmup_iters", int),
    "--lr-decay-iters": ("decay_iters", int),
    "--lr-decay-style": ("decay_style", str),
}
"""The settings a live rollback can change for the new branch (flag -> LR schedule field, type):
the learning-rate schedule. Everything else (the model, the layout, the batch, the data) is
fixed for the job's life: a relaunch changes it."""


class RequestRefused(ValueError):
    """A request file that is not a usable request; the message says why. ``request_id``: the
    refused request's id where it could be read (its answer carries it)."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class RollbackRequest:
    """What ``rollback.sh --live`` asks of a running job."""

    step: int
    """The iteration to go back to."""
    id: str
    """Names the request; its answer carries it."""
    branch: str | None = None
    """Where the abandoned versions are moved (``branches/<branch>/``); None: a name from the time."""
    iterations_to_skip: tuple[int, ...] = ()
    """Iterations whose batches the new branch skips (``--iterations-to-skip``)."""
    settings: tuple[tuple[str, Any], ...] = ()
    """(flag, value) of :data:`LIVE_SETTINGS` for the new branch."""
    job: str | None = None
    """The job it was asked of: ``--save``'s lock holder then (``job_lock.LockHolder.key``). A job
    that is not that one refuses it: a request that outlived its job (asked from another node,
    never answered) must not roll back the next job launched on ``--save``. None: any job."""

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise RequestRefused(f"the step must be an iteration >= 0, got {self.step!r}")
        if not isinstance(self.id, str) or not self.id or len(self.id) > 64:
            raise RequestRefused(f"the id must be a short string, got {self.id!r}")
        if self.job is not None and (not isinstance(self.job, str) or not self.job or len(self.job) > 300):
            raise RequestRefused(f"the job must be a short string, got {self.job!r:.80}")
        if self.branch is not None and (not isinstance(self.branch, str) or not self.branch
                                        or "/" in self.branch or self.branch.startswith(".")):
            raise RequestRefused(f"the branch must be a plain folder name, got {self.branch!r}")
        skips = self.iterations_to_skip
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in skips):
            raise RequestRefused(f"--iterations-to-skip takes iterations >= 1, got {list(skips)}")
        object.__setattr__(self, "iterations_to_skip", tuple(sorted(set(skips))))
        checked = []
        for item in self.settings:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise RequestRefused(f"a setting must be a (flag, value) pair, got {item!r}")
            name, value = item
            if name not in LIVE_SETTINGS:
                raise RequestRefused(
                    f"{name} cannot change on a live rollback: only {', '.join(LIVE_SETTINGS)} can (the learning-rate "
                    "schedule); the model, the layout, the batch and the data change with a relaunch")
            kind = LIVE_SETTINGS[name][1]
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise RequestRefused(f"{name} takes a {kind.__name__}, got {value!r}")
            checked.append((name, kind(value)))
        object.__setattr__(self, "settings", tuple(checked))

    @classmethod
    def new(cls, step: int, **fields) -> "RollbackRequest":
        return cls(step=step, id=uuid.uuid4().hex[:16], **fields)

    def schedule_changes(self) -> dict[str, Any]:
        """The LR schedule's fields the request changes (``trainer.lr_schedule.LRScheduleConfig``)."""
        return {LIVE_SETTINGS[name][0]: value for name, value in self.settings}

    def describe(self) -> str:
        extras = [f"skipping iterations {list(self.iterations_to_skip)}"] if self.iterations_to_skip else []
        extras += [f"{name} {value}" for name, value in self.settings]
        return f"iteration {self.step}" + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True)
class RollbackAnswer:
    """The job's answer to one request."""

    id: str
    done: bool
    """Rolled back (else refused, and training went on where it was)."""
    message: str
    step: int | None = None
    source: str | None = None
    """Where the state came from (``L0``, ``L1``, ``L2``), when done."""
    seconds: float | None = None
    """From the request's pickup to the restored state, when done."""


def _write_private(path: str, record: dict) -> None:
    """``record`` as JSON at ``path``, mode 0600, whole or not at all (a temporary file renamed)."""
    temporary = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = private_files.create_new(temporary, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o600)  # whatever the umask did
        os.rename(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def _read_private(path: str) -> dict:
    """The JSON object at ``path``, after the private-file checks; raises :class:`RequestRefused`."""
    why = private_files.problem(path, private=True)
    if why is not None:
        raise RequestRefused(f"{path} was not read: {why} (write requests with scripts/rollback.sh --live)")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RequestRefused(f"{path} is over {MAX_BYTES} bytes: not a request")
    try:
        record = json.loads(data)
    except ValueError as error:
        raise RequestRefused(f"{path} is not JSON ({error})") from None
    if not isinstance(record, dict):
        raise RequestRefused(f"{path} holds {type(record).__name__}, not a JSON object")
    return record


def write_request(save_dir: str, request: RollbackRequest) -> str:
    """Place ``request`` for the job writing ``save_dir``; refused while another one waits there."""
    path = os.path.join(save_dir, REQUEST_NAME)
    if os.path.lexists(path):
        raise RequestRefused(f"{path} exists: a request is waiting for the job to take it. Wait for its answer, "
                             "or remove the file if no job runs on this --save")
    _write_private(path, dataclasses.asdict(request))
    return path


def withdraw(save_dir: str, request: RollbackRequest) -> bool:
    """Remove ``request`` if it still waits in ``save_dir`` (not taken, not another's); returns
    whether it did."""
    path = os.path.join(save_dir, REQUEST_NAME)
    try:
        if _read_private(path).get("id") != request.id:
            return False
        os.unlink(path)
        return True
    except (RequestRefused, OSError):
        return False


def pending(save_dir: str) -> bool:
    """Whether a request file is there (one ``stat``: the per-iteration check)."""
    try:
        os.lstat(os.path.join(save_dir, REQUEST_NAME))
        return True
    except OSError:
        return False


def take_request(save_dir: str) -> RollbackRequest:
    """Read and remove the request in ``save_dir``. Raises :class:`RequestRefused` for one that
    fails the checks or is malformed, after setting it aside (renamed ``.refused-<pid>``)."""
    path = os.path.join(save_dir, REQUEST_NAME)
    record: dict = {}
    try:
        record = _read_private(path)
        known = {f.name for f in dataclasses.fields(RollbackRequest)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise RequestRefused(f"{path} has fields no request has: {unknown}")
        if "step" not in record or "id" not in record:
            raise RequestRefused(f"{path} names no step and id")
        record["iterations_to_skip"] = tuple(record.get("iterations_to_skip") or ())
        record["settings"] = tuple(tuple(s) if isinstance(s, list) else s for s in record.get("settings") or ())
        request = RollbackRequest(**record)
    except (RequestRefused, OSError) as error:
        rid = record.get("id") if isinstance(record.get("id"), str) else None
        if os.path.lexists(path):
            aside = private_files.set_aside(path)
            raise RequestRefused(f"{error}; set aside as {aside}", rid) from None
        raise RequestRefused(str(error), rid) from None
    os.unlink(path)
    return request


def asked_of_another_job(save_dir: str, request: RollbackRequest) -> str | None:
    """Why this process's job must refuse ``request`` as another's (None: it is this job's, or
    any job's). Asked by the process that holds ``save_dir``'s lock (rank 0)."""
    own = job_lock.own_record(job_lock.lock_path_for_save(save_dir))
    if request.job is None or own is None or request.job == own.key():
        return None
    return (f"it was asked of another job on --save {save_dir} ({request.job}), not this one ({own.key()}): one that "
            "has ended; ask this job again")


def write_answer(save_dir: str, answer: RollbackAnswer) -> None:
    _write_private(os.path.join(save_dir, ANSWER_NAME), dataclasses.asdict(answer))


def _answer_to(save_dir: str, request: RollbackRequest) -> RollbackAnswer | None:
    try:
        record = _read_private(os.path.join(save_dir, ANSWER_NAME))
    except (RequestRefused, OSError):
        return None
    if record.get("id") != request.id:
        return None
    known = {f.name for f in dataclasses.fields(RollbackAnswer)}
    return RollbackAnswer(**{k: v for k, v in record.items() if k in known})


def wait_for_answer(save_dir: str, request: RollbackRequest, timeout: float,
                    progress: Callable[[float], None] | None = None,
                    gone: Callable[[], bool] | None = None) -> RollbackAnswer | None:
    """The job's answer to ``request`` (None: none within ``timeout`` seconds, or ``gone()``, asked
    twice a second, said the job has ended); ``progress(waited)`` is called every 10 s of waiting."""
    started = last = looked = time.monotonic()
    while time.monotonic() - started < timeout:
        ended = False
        if gone is not None and time.monotonic() - looked >= 0.5:
            looked, ended = time.monotonic(), gone()
        answer = _answer_to(save_dir, request)  # read after the look: a job may answer, then end, between two
        if answer is not None or ended:
            return answer
        if progress is not None and time.monotonic() - last >= 10:
            last = time.monotonic()
            progress(last - started)
        time.sleep(0.05)
    return None
