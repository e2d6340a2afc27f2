#!/usr/bin/env python
"""Checkpointing at 64 to 16,384 ranks, simulated (``benchmarks.scale``): the bytes each rank
gathers, the coordinator's metadata build and write, the ``.metadata`` size, a rank's load plan
into another layout; before (full records, pairwise tiling, scan) and after (save plan, sweep,
index).

    python scripts/bench_scale.py [--case 1.3B@64 ...] [--cap 600] [--versions 3]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.scale import CASES, run_case, table  # noqa: E402


def main() -> None:
    names = [c.name for c in CASES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=names, help="a case (repeatable; default: all)")
    parser.add_argument("--cap", type=float, default=600.0,
                        help="seconds the pairwise (before) metadata build may take; past it: '> CAP s'")
    parser.add_argument("--versions", type=int, default=3, help="versions filled from the plan (the best is shown)")
    args = parser.parse_args()
    rows = []
    for case in [c for c in CASES if args.case is None or c.name in args.case]:
        row = run_case(case, args.cap, args.versions)
        print(f"{case.name}: simulated {row['records']:,} records of {row['ranks']:,} ranks in "
              f"{row['simulate_s']:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
    print(table(rows, args.cap))


if __name__ == "__main__":
    main()
