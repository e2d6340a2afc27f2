#!/usr/bin/env python
"""Flip every one of N random single bits of a committed checkpoint's ``.metadata`` in turn and
classify what reading it does: damaged (the loader falls back), decoded, refused as untrusted,
or a crash (anything else); with its checksum file, then without it (an older or foreign
checkpoint). Also reports how much the reads grew this process's peak memory.

    python scripts/metadata_flips.py CKPT/iter_0000010 [--flips 3000] [--seed 20261207]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import resource
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing.base import CheckpointCorruptError, CheckpointUntrustedError  # noqa: E402
from checkpointing.format import METADATA_CHECKSUM_NAME, METADATA_NAME, read_metadata  # noqa: E402


def classify(directory: str, flips: int, seed: int) -> tuple[int, collections.Counter, float]:
    """(size of .metadata, outcome counts, MiB the peak resident memory grew) over ``flips`` flips."""
    path = os.path.join(directory, METADATA_NAME)
    pristine = open(path, "rb").read()
    outcomes: collections.Counter = collections.Counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for bit in random.Random(seed).sample(range(8 * len(pristine)), min(flips, 8 * len(pristine))):
        data = bytearray(pristine)
        data[bit // 8] ^= 1 << (bit % 8)
        with open(path, "wb") as f:
            f.write(data)
        try:
            read_metadata(directory)
            outcomes["decoded"] += 1
        except CheckpointCorruptError:
            outcomes["damaged"] += 1
        except CheckpointUntrustedError:
            outcomes["refused as untrusted"] += 1
        except BaseException as error:  # what this script exists to count
            outcomes[f"crash: {type(error).__name__}"] += 1
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    return len(pristine), outcomes, grew


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a committed iter_NNNNNNN directory (it is copied, not changed)")
    parser.add_argument("--flips", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=20261207)
    args = parser.parse_args()
    crashes = 0
    for checksummed in (True, False):
        work = tempfile.mkdtemp(prefix="metadata-flips-")
        copy = os.path.join(work, os.path.basename(os.path.normpath(args.checkpoint)))
        try:
            shutil.copytree(args.checkpoint, copy)
            if not checksummed and os.path.exists(os.path.join(copy, METADATA_CHECKSUM_NAME)):
                os.unlink(os.path.join(copy, METADATA_CHECKSUM_NAME))
            size, outcomes, grew = classify(copy, args.flips, args.seed)
        finally:
            shutil.rmtree(work)
        crashes += sum(n for k, n in outcomes.items() if k.startswith("crash"))
        which = "with its checksum file" if checksummed else "without its checksum file"
        print(f"{which}: {sum(outcomes.values())} flips of {size} bytes: "
              + ", ".join(f"{k} {n}" for k, n in outcomes.most_common()) + f"; peak memory grew {grew:.1f} MiB")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
