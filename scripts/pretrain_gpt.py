#!/usr/bin/env python
"""Train a GPT with 3D parallelism. Launch with torchrun, e.g.

    torchrun --nproc-per-node 8 scripts/pretrain_gpt.py --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --use-distributed-optimizer --mock-data ...

Arguments keep Megatron-LM's names; ``--help`` lists them.

An error the project raises on purpose (a bad argument, a checkpoint that cannot be used, a
directory that cannot be written) is printed once, by rank 0, as one line; ``GPT_DEBUG=1`` prints
its traceback on every rank instead. Any other exception prints its traceback. Under torchrun
each rank also leaves the line in its error file, so that torchrun's failure table, the last
thing it prints, names it as the root cause (``trainer.process_life.tell_launcher``).
"""

import os
import sys
import traceback
import warnings

# OpenBLAS (numpy's) starts a thread pool at import unless told one thread: a process with a
# second thread cannot fork the checkpoint flushers' template safely, and training uses torch's
# kernels, not numpy's BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# megatron-core warns at import about fused kernels (Apex, TE) that a CPU machine never has.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.arguments import ArgumentError, parse_job_config  # noqa: E402
from trainer.process_life import tell_launcher  # noqa: E402


def _error(line: str, say: bool = True) -> None:
    """An error raised on purpose: ``line`` on stderr (where ``say``), and to torchrun."""
    if say:
        print(line, file=sys.stderr)
        sys.stderr.flush()
    tell_launcher(line)


def main() -> int:
    try:
        job = parse_job_config()
    except ArgumentError as error:
        _error(f"pretrain_gpt.py: error: {error}", say=os.environ.get("RANK", "0") == "0")
        return 2
    from trainer.device import DeviceError, select_device
    from trainer.process_life import die_with_launcher
    from trainer.training import pretrain, shutdown

    die_with_launcher()  # a launcher killed outright leaves no trainer running on its checkpoint
    if job.checkpoint.async_save and job.checkpoint.flusher_start == "template":  # before the device and any thread: the flushers are forked from it
        from checkpointing.engine import start_template

        start_template()

    try:
        device_ctx = select_device()
    except DeviceError as error:
        _error(f"pretrain_gpt.py: error on rank {os.environ.get('RANK', '0')}: {error}")
        return 2
    from checkpointing.base import CheckpointError, CheckpointWriteError, FlusherError
    from checkpointing.manager import SaveDirError
    from trainer.data import DataError
    from trainer.live_rollback import RollbackLimitError

    try:
        pretrain(job, device_ctx)
    except DataError as error:
        # Found by the ranks that read the offending sample, not agreed: each of them says it.
        _error(f"pretrain_gpt.py: error on rank {os.environ.get('RANK', '0')}: {error}")
        os._exit(1)
    except (CheckpointError, CheckpointWriteError, SaveDirError, RollbackLimitError) as error:
        if isinstance(error, FlusherError) or os.environ.get("GPT_DEBUG") or os.environ.get("GPT_TRACEBACK"):
            traceback.print_exc()  # a flusher's failure is ours to debug: its traceback matters
        else:
            # An error raised on purpose names the file and what to do. These are agreed over the
            # ranks (every rank raises the same one), so rank 0 says it once; the others exit quietly.
            _error(f"pretrain_gpt.py: error: {error}", say=os.environ.get("RANK", "0") == "0")
        sys.stderr.flush()
        os._exit(1)  # as below: no clean teardown while peers may wait in a collective
    except BaseException:
        # Do not tear the process groups down cleanly: peers may be blocked in a collective with
        # this rank, and a clean destroy would wait for them. Exiting closes our connections, so
        # their collectives fail (or time out after --distributed-timeout-minutes) and torchrun
        # stops the job.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
