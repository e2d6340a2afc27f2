"""Named fault points on the checkpoint path, armed by an environment variable for tests.

``GPT_CKPT_FAULT=<point>:<action>`` with action ``kill`` (SIGKILL this process)
or ``fail`` (raise an ``OSError`` as a full disk would). Unset, a point costs a dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "GPT_CKPT_FAULT"


def reach(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "fail":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")


def delay(point: str) -> float:
    """Seconds to sleep at ``point`` (``GPT_CKPT_DELAY=<point>:<milliseconds>``): a slow copy or disk."""
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return 0.0
    name, _, ms = spec.partition(":")
    return float(ms) / 1000.0 if name == point else 0.0


DELAY_ENV = "GPT_CKPT_DELAY"
