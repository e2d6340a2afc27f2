#!/usr/bin/env python
"""Fault-injection trials of the checkpoint engine: kill or damage, resume, check
(``benchmarks/fault_trials.py`` says what each trial does and checks).

    python scripts/fault_trials.py --trials 100 [--seed 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fault_trials import run_trials, summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="fault-trials-")
    results = run_trials(args.trials, args.seed, workdir, parallel=args.parallel)
    print(summary(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
