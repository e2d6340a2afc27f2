#!/usr/bin/env python
"""What checkpointing costs training on this machine, measured as ratios within one run.

1 process, a GPT whose checkpointed training state (fp32 main weights and both Adam moments) is
about 1 GB. Five parts:

- ``format``: one synchronous save (``checkpointing.format.commit``) and one load (resharding reader,
  checksums verified) next to the machine's raw write+fsync and cold read of the same bytes.
- ``flush-cost``: the CPU and wall time of one flush of the state against the raw ``O_DIRECT``
  write the CheckFreq-style row makes, and of the xxh3 checksums alone: what the engine's extra
  work per version costs.
- ``restore``: a resume's read of one committed checkpoint (issue 18), as a user's resume does it:
  in a fresh process whose trainer is built (its live arrays allocated and initialised), the
  optimizer state read through ``CheckpointReader`` (checksums verified) straight into them; next
  to a raw sequential ``O_DIRECT`` read of the same data files (as ``dd iflag=direct bs=64M``),
  the page cache dropped before each, in interleaved rounds. ``--reader-file`` adds the
  ``CheckpointReader`` of another file (e.g. the one before issue 18) to each round.
- ``overhead``: interleaved rounds of K iterations per method, checkpointing every iteration:
  none; this engine with L0 every iteration + L1 every 10th; this engine every iteration to
  disk (L2), as fast as the disk goes and with ``--ckpt-write-rate-limit``; torch.save + fsync;
  DCP save; DCP async_save with a thread and with a process. Overhead = median iteration time /
  median without checkpointing - 1; blocked = time the training thread spent in checkpoint calls
  and fences, per checkpoint. Each round's line also gives the CPU seconds per iteration of
  each thread of the training process (training, OpenMP workers) and the flusher process's CPU.

- ``host-bound``: the product CLI (``pretrain_gpt.py``) on a model whose iteration is Python and op
  dispatch (16 layers x 128, seq 64, 8 micro-batches of 1), one OpenMP thread, so the second core
  is free for the flusher process: none, L0 every iteration + L1 every 10th, every iteration to
  disk; interleaved rounds, time between consecutive iterations (their ``--metrics-file`` objects),
  with the run's summary.

Each method of a round runs in a process of its own, so that each can have its own OpenMP wait
policy (``method@passive``); overheads are against ``none`` with OpenMP's default.

    python scripts/bench_checkpoint.py [--part format|flush-cost|restore|overhead|host-bound|all] [--rounds 2] [--iters 6] [--methods ...]
        [--reader-file FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ckpt_bench import PARTS, UnknownMethod, method_specs, run_parts  # noqa: E402
from benchmarks.ckpt_overhead import DEFAULT_METHODS, child  # noqa: E402
from benchmarks.ckpt_restore import child_restore  # noqa: E402
from benchmarks.methods import METHODS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, of {', '.join(METHODS)}, each with an optional @passive or @active "
                             "(OMP_WAIT_POLICY of its process)")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--reader-file", help="restore: also time the CheckpointReader defined in this file, e.g. the "
                        "one before issue 18 (git show 2ffe828:checkpointing/format/reader.py > /tmp/reader_before.py)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-restore", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.iters, args.warmup, args.workdir)
        return 0
    if args.child_restore:
        child_restore(args.child_restore, args.reader_file)
        return 0
    try:
        specs = method_specs(args.methods)
    except UnknownMethod as error:
        parser.error(str(error))
    workdir = os.path.abspath(args.workdir) if args.workdir else None
    run_parts(args.part, args.rounds, args.iters, args.warmup, specs, workdir, args.reader_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
