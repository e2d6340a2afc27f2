"""A rank for tests/test_job_zygote.py: ``env`` prints what it was started with (JSON),
``fail R CODE`` exits with CODE on rank R while the others wait forever, ``raise`` raises,
``sleep`` sleeps until killed."""

import json
import os
import sys
import time

mode = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
if mode == "env":
    # One write of the whole line: the ranks share the pipe, and an unbuffered print (as under
    # torchrun's `python -u`) writes the text and its newline apart, so lines of two ranks could meet.
    seen = {"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "main": __name__,
            "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                   "MASTER_ADDR", "MASTER_PORT", "PROBE")}}
    os.write(1, (json.dumps(seen) + "\n").encode())
elif mode == "fail":
    if rank == int(sys.argv[2]):
        print(f"rank {rank} fails", file=sys.stderr, flush=True)
        sys.exit(int(sys.argv[3]))
    time.sleep(3600)
elif mode == "raise":
    raise ValueError("the probe raised")
elif mode == "sleep":
    os.write(1, f"{os.getpid()}\n".encode())  # one write: the ranks share the pipe
    time.sleep(3600)
