#!/usr/bin/env python
"""What peer replicas (``--ckpt-peer-replicas``) cost training, and what they save a resume after
a lost node, measured as ratios within one run on two "nodes" of this machine
(``benchmarks/peer_replicas.py`` says what each part runs).

    python scripts/bench_peer_replicas.py [--part overhead|recovery|all] [--rounds 3]
        [--models host-bound,1 GB] [--iters-host-bound 30] [--iters-1gb 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.peer_replicas import OVERHEAD_MODELS, part_overhead, part_recovery  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("overhead", "recovery", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(OVERHEAD_MODELS),
                        help=f"overhead: comma-separated, of {', '.join(OVERHEAD_MODELS)}")
    parser.add_argument("--iters-host-bound", type=int, default=30)
    parser.add_argument("--iters-1gb", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", help="where checkpoints and logs go (default: a temporary directory)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in OVERHEAD_MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(OVERHEAD_MODELS)})")
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="bench-peer-")
    if args.part in ("overhead", "all"):
        part_overhead(workdir, args.rounds, {"host-bound": args.iters_host_bound, "1 GB": args.iters_1gb},
                      args.warmup, models)
    if args.part in ("recovery", "all"):
        part_recovery(workdir, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
