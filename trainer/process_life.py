"""A trainer lives no longer than its launcher.

torchrun's agent stops its workers when it is asked to, but an agent killed outright (SIGKILL, an
OOM kill) leaves them running as orphans: still training, still holding their checkpoint
directories, and a relaunch then meets them (``checkpointing.base.job_lock`` refuses it, naming them).
Under torchrun each trainer therefore asks the kernel to SIGKILL it when its parent dies
(``PR_SET_PDEATHSIG``); the L0 pool it leaves is what the next launch recovers from.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_launcher(environ=os.environ) -> bool:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), SIGKILL this process when its launcher dies;
    exits at once if it already has. Returns whether the request was made (Linux only)."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return False  # a plain `python pretrain_gpt.py`: its parent is a shell, not a launcher
    launcher = os.getppid()
    try:
        made = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (AttributeError, OSError):
        return False
    if os.getppid() != launcher:  # it died between the two calls
        os.kill(os.getpid(), signal.SIGKILL)
    return made
