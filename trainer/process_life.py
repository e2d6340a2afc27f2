"""A trainer lives no longer than its launcher, and tells it why it failed.

torchrun's agent stops its workers when it is asked to, but an agent killed outright (SIGKILL, an
OOM kill) leaves them running as orphans: still training, still holding their checkpoint
directories, and a relaunch then meets them (``checkpointing.base.job_lock`` refuses it, naming them).
Under torchrun each trainer therefore asks the kernel to SIGKILL it when its parent dies
(``PR_SET_PDEATHSIG``); the L0 pool it leaves is what the next launch recovers from.

When a worker fails, torchrun ends with its own traceback and a failure table whose "root
cause" says only "To enable traceback see: ..." unless the worker left an error file. A trainer
that stops on an error raised on purpose (a bad argument, a checkpoint it cannot use) leaves its
one-line message there (:func:`tell_launcher`), so the last lines a user reads name it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time

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


def tell_launcher(message: str, environ=os.environ) -> bool:
    """Under torchrun (``TORCHELASTIC_ERROR_FILE`` set: a file in the agent's private temporary
    directory, one per worker), leave ``message`` as this worker's error, in the format of torch's
    own ``ErrorHandler`` without its call stack: torchrun's failure table then shows ``message``
    as the root cause. A file already there (another writer's) is left as it is, and a link is
    not followed. Returns whether the file was written."""
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    record = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
    except OSError:
        return False  # exists, its directory is gone, a full disk: torchrun then says what it says without it
    return True
