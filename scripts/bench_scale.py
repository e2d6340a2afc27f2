#!/usr/bin/env python
"""Checkpointing at 64 to 16,384 ranks, simulated (``benchmarks.scale``): the bytes each rank
gathers, the coordinator's metadata build and write, the ``.metadata`` size, a rank's load plan
into another layout; before (full records, pairwise tiling, scan) and after (save plan, sweep,
index); and a node-local level's coordinator on one node of ``--node-size`` ranks.

    python scripts/bench_scale.py [--case 1.3B@64 ...] [--cap 600] [--versions 3] [--node-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.scale import CASES, node_local_table, run_case, run_node_local, table  # noqa: E402


def main() -> None:
    names = [c.name for c in CASES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=names, help="a case (repeatable; default: all)")
    parser.add_argument("--cap", type=float, default=600.0,
                        help="seconds the pairwise (before) metadata build may take; past it: '> CAP s'")
    parser.add_argument("--versions", type=int, default=3, help="versions filled from the plan (the best is shown)")
    parser.add_argument("--node-size", type=int, default=8, help="ranks per node of the node-local part (0: skip it)")
    args = parser.parse_args()
    if args.node_size < 0:
        parser.error("--node-size must be 0 (skip the node-local part) or more")
    rows, node_rows = [], []
    for case in [c for c in CASES if args.case is None or c.name in args.case]:
        row = run_case(case, args.cap, args.versions)
        print(f"{case.name}: simulated {row['records']:,} records of {row['ranks']:,} ranks in "
              f"{row['simulate_s']:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
        if args.node_size:
            node_rows.append(run_node_local(case, args.node_size, args.versions))
    print(table(rows, args.cap))
    if node_rows:
        print(f"\nNode-local level (L1), one node of {args.node_size} ranks:\n")
        print(node_local_table(node_rows, args.cap))


if __name__ == "__main__":
    main()
