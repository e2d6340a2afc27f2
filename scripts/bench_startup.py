#!/usr/bin/env python
"""Start-up and the flusher's CPU per GB, measured as ratios within one run
(``benchmarks/startup.py`` says what each part runs).

    python scripts/bench_startup.py [--part startup|cpu-per-gb|all] [--rounds 5] [--iters 30]
        [--out results/bench_startup_cpu.md] [--workdir DIR]
    python scripts/bench_startup.py --part before-after --old-tree DIR [--rounds 3]   (DIR: e.g.
        git worktree add /tmp/old <commit>)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.startup import part_before_after, part_cpu_per_gb, part_startup  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("startup", "cpu-per-gb", "before-after", "all"), default="all")
    parser.add_argument("--old-tree", help="before-after: a checkout of the earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30, help="cpu-per-gb: iterations (each version to disk)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--workdir", help="where checkpoints and logs go (default: a temporary directory)")
    args = parser.parse_args()
    if args.rounds < 1 or args.iters < 2:
        parser.error("--rounds must be >= 1 and --iters >= 2")
    if args.part == "before-after" and not (args.old_tree and os.path.isfile(
            os.path.join(args.old_tree, "scripts", "pretrain_gpt.py"))):
        parser.error("--part before-after needs --old-tree DIR, a checkout with scripts/pretrain_gpt.py")
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="bench-startup-")
    command = "python scripts/bench_startup.py " + " ".join(sys.argv[1:])
    out = [f"# Start-up and the flusher's CPU per GB ({datetime.date.today()}, {platform.node() or 'this machine'}, "
           f"{os.cpu_count()} CPUs)", "", f"Command: `{command}`", ""]
    if args.part in ("startup", "all"):
        print("> start-up: 2-process TP2 tiny GPT, interleaved rounds", flush=True)
        out += ["## Launch to the end of the first iteration (2-process TP2 tiny GPT, medians of "
                f"{args.rounds} interleaved rounds)", "", *part_startup(workdir, args.rounds), ""]
    if args.part in ("cpu-per-gb", "all"):
        print("> cpu-per-gb: host-bound model, every version to disk", flush=True)
        out += [f"## The flusher's CPU per GB written (the host-bound model and a wide one, 1 process, every version to L2, "
                f"{args.iters} iterations, medians of {args.rounds} rounds)", "",
                *part_cpu_per_gb(workdir, args.rounds, args.iters), ""]
    if args.part == "before-after":
        print("> before-after: launch to the first iteration's console line", flush=True)
        out += [f"## Launch to the first iteration's console line, {args.old_tree} against this tree (2-process TP2 "
                f"tiny GPT, medians of {args.rounds} interleaved rounds)", "",
                *part_before_after(workdir, args.rounds, args.old_tree), ""]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
