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
