#!/usr/bin/env python
"""A run's history at a glance, from its committed checkpoints (any level, checksums verified):
per iteration, the global weight norm, the norm of the change from the previous checkpoint, the
mean of Adam's second moment, and the layers that changed most relative to their size.

    python scripts/ckpt_history.py ckpts [--tensorboard-dir ckpts/tensorboard-history]
    python scripts/ckpt_history.py /local/ckpts ckpts      # L1 and L2 together (L1 first at equal iterations)

One tensor is read at a time (two held: this checkpoint's and the previous one's), so memory is
bounded by the largest tensor, not the model.
"""

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing.base import CheckpointConfig, CheckpointError  # noqa: E402
from cli.flags import add_flag  # noqa: E402
from interop.history import checkpoint_history, checkpoint_paths, format_history, write_tensorboard  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directories of one run (--save, --ckpt-local-dir)")
    p.add_argument("--tensorboard-dir", help="also write the history as TensorBoard scalars (history/*) here")
    p.add_argument("--top", type=int, default=3, help="layers listed per iteration (default 3)")
    p.add_argument("--exclude", type=int, nargs="+", default=[], metavar="N", help="leave out these iterations")
    add_flag(p, CheckpointConfig, "verify_checksums")  # declared once, as the trainer has them
    add_flag(p, CheckpointConfig, "trust_pickles")
    return p


def main() -> int:
    args = build_parser().parse_args()
    found = checkpoint_paths(args.dirs, frozenset(args.exclude))
    if not found:
        print(f"ckpt_history.py: error: no committed checkpoint in {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    try:
        rows = checkpoint_history([path for _, path in found], args.verify_checksums, args.trust_pickles)
    except CheckpointError as error:
        print(f"ckpt_history.py: error: {error}\n  (scripts/rollback.sh --list --verify shows every checkpoint's state; "
              "--exclude N leaves a damaged one out)", file=sys.stderr)
        return 2
    print(f"> {len(rows)} committed checkpoints of {' '.join(args.dirs)}")
    for line in format_history(rows, args.top):
        print(line)
    if args.tensorboard_dir:
        write_tensorboard(rows, args.tensorboard_dir)
        print(f"> TensorBoard scalars history/* in {args.tensorboard_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
