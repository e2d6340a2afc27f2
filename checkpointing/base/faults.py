"""Named fault points on the checkpoint and training path, armed by environment variables.

``GPT_CKPT_FAULT=<point>:<action>[:<iteration>[:<rank>]]`` with action ``kill`` (SIGKILL this
process), ``fail`` (an ``OSError`` as a full disk raises) or ``readonly`` (as a read-only
directory does, which root cannot otherwise be shown); the optional iteration and
rank narrow where it fires. With ``GPT_CKPT_FAULT_ONCE=<path>`` it fires once per job: the file
is created first and a restarted process that finds it goes on. ``GPT_CKPT_DELAY=<point>:<ms>``
slows a point down (a slow copy or disk). Unset, a point costs one environment lookup.

``GPT_CKPT_HOLD=<point>[:<iteration>][,...]`` makes the engine's background work keep step with
training at a point, so that a test's outcome follows from the engine's rules and not from how
fast a loaded machine runs its threads (no iteration: every version):

- ``request``: ``request(N)`` first waits until version N-1 is in L0 and every flush queued
  before it has finished. No version is then superseded (every version due on a level reaches
  it), and when training passes iteration N, L0 holds N-1 and every level its due versions up to
  N-1. A zero-copy step first waits until every requested version is in L0, so when a step
  after ``--save-interval`` > 1 is killed, L0 holds the newest version requested before it.
  Training then waits on the disk, which the engine otherwise never does: for tests only.
- ``flush`` (zero-copy snapshots): a flush starts writing a slot only once an optimizer step is
  blocked in a fence on that slot (or the engine drains), and no queued flush is superseded:
  with two slots, every step from the third waits at a fence for the flush of the version two
  steps back, shard by shard, and every version reaches its levels.
- ``read:N`` (zero-copy snapshots): a flush stops once it has read N shards of its slot, until an
  optimizer step is blocked in a fence on that slot (or the engine drains).

- ``live-request:N``: rank 0 looks for a live-rollback request file at iteration N only (give
  it several times for several N; ``trainer.live_rollback``), so a request a test placed before
  the launch is taken at N.

``GPT_CKPT_DISK_GATE=<path>``: every flush waits until ``<path>`` exists (``{rank}`` in it becomes
the rank): a stuck disk that a test frees by creating the file.

``GPT_CKPT_INJECT_SPIKE=N[,M...]`` multiplies the loss iteration N reports by 100, once per
process (:func:`injected_spike`): a loss spike for the automatic rollback's tests.

The holds are read by ``checkpointing.engine.pacing``: the engine's rules do not look at them.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "GPT_CKPT_FAULT"
ONCE_ENV = "GPT_CKPT_FAULT_ONCE"
DELAY_ENV = "GPT_CKPT_DELAY"
HOLD_ENV = "GPT_CKPT_HOLD"
DISK_GATE_ENV = "GPT_CKPT_DISK_GATE"


def reach(point: str, iteration: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, action, *where = spec.split(":")
    if name != point:
        return
    if where and where[0] and iteration != int(where[0]):
        return
    if len(where) > 1 and os.environ.get("RANK", "0") != where[1]:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "fail":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    if action == "readonly":
        raise OSError(errno.EROFS, f"Read-only file system (injected at {point})")
    raise ValueError(f"{ENV}={spec}: action must be kill, fail or readonly")


def delay(point: str) -> float:
    """Seconds to sleep at ``point``."""
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return 0.0
    name, _, ms = spec.partition(":")
    return float(ms) / 1000.0 if name == point else 0.0


def holds(point: str, iteration: int | None = None) -> bool:
    """Whether ``GPT_CKPT_HOLD`` holds ``point`` at ``iteration`` (None: at any iteration)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return False
    for item in spec.split(","):
        name, _, at = item.strip().partition(":")
        if name == point and (not at or iteration is None or int(at) == iteration):
            return True
    return False


def hold_value(point: str) -> int | None:
    """The number of ``GPT_CKPT_HOLD``'s ``<point>:<N>`` (None: the point is not held)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        name, _, at = item.strip().partition(":")
        if name == point:
            return int(at)
    return None


SPIKE_ENV = "GPT_CKPT_INJECT_SPIKE"
_spikes_fired: set[int] = set()


def injected_spike(iteration: int) -> float:
    """The factor ``GPT_CKPT_INJECT_SPIKE=N[,M...]`` multiplies iteration N's reported loss by: 100
    the first time this process reaches N, 1.0 otherwise (a replayed or skipped N is not hit
    again). A test hook: ``trainer.live_rollback`` reads it, no production rule does."""
    spec = os.environ.get(SPIKE_ENV)
    if not spec or iteration in _spikes_fired:
        return 1.0
    try:
        wanted = {int(item) for item in spec.split(",") if item.strip()}
    except ValueError:
        raise ValueError(f"{SPIKE_ENV}={spec}: give iterations separated by commas, e.g. 20,35") from None
    if iteration not in wanted:
        return 1.0
    _spikes_fired.add(iteration)
    return 100.0
