#!/usr/bin/env python
"""The real trainer (``scripts/pretrain_gpt.py``) on one GPU: does it compute what the CPU
computes, how fast, and what does the checkpoint engine cost it. Writes a markdown report.

a. CPU vs GPU: the tiny preset in fp32 without dropout, once with ``GPT_FORCE_CPU=1`` and once
   on the GPU; the lm loss of every iteration must agree within 1e-4.
b. A 350M GPT (GPT-3 Medium shape) in bf16 with the distributed optimizer: (i) without
   checkpointing, (ii) with the engine (L0 every iteration, L1 every 10th): median iteration
   time, tokens/s, model FLOPs utilisation, the overhead of (ii) and the engine's own counters.
c. Device-to-host bandwidth into pageable, torch-pinned and CUDA-registered shared memory (the
   engine's host pool), and the bf16 matmul peak the MFU is measured against.
d. (optional) a 1.3B GPT in bf16: tokens/s and MFU.
e. (optional, last, only while the budget lasts) llama3-1B (RoPE, RMSNorm, SwiGLU, grouped-query
   attention) at sequence 4096 in bf16, without and with the engine: tokens/s, MFU, peak GPU
   memory (the metrics file's ``peak_device_mib``) and the engine's iteration-time ratio.

Each trainer run is one plain ``python scripts/pretrain_gpt.py`` process (a 1-process job) with
its own timeout; a failed run is reported with the tail of its log and the others go on. The
report is rewritten after every step, so a run killed from outside still leaves what it had.

    python3 scripts/bench_trainer_gpu.py --out results/gpu/bench_trainer_gpu.md   # on the GPU machine
    python scripts/bench_trainer_gpu.py --dry-run     # anywhere: every command through the trainer's parser
    python scripts/bench_trainer_gpu.py --smoke --out /tmp/smoke.md   # on CPU: the whole pipeline, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_bench import bench  # noqa: E402
from benchmarks.gpu_hardware import measure_hardware  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown report here (rewritten after every step)")
    parser.add_argument("--workdir", help="checkpoints, traces and logs (default: a new directory under /tmp)")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="wall-clock budget of all runs; a run that no longer fits is skipped with a note")
    parser.add_argument("--no-1p3b", dest="large", action="store_false", help="skip (d), the 1.3B run")
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="skip (e), the llama3-1B pair")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints are GBs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="parse every command with the trainer's parser, print them, exit (no GPU needed)")
    mode.add_argument("--smoke", action="store_true",
                      help="run everything on the CPU with the tiny model (tests this script; numbers mean nothing)")
    parser.add_argument("--part", choices=("hardware",), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "hardware":
        if not args.json:
            parser.error("--part hardware needs --json PATH")
        return measure_hardware(args.json)
    return bench(args.out, args.workdir, args.budget_s, args.large, args.keep, args.dry_run, args.smoke, args.llama)


if __name__ == "__main__":
    raise SystemExit(main())
