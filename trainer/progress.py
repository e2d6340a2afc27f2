"""One progress bar for the long user-facing work (data preparation, conversion, history).

tqdm on a terminal; disabled when stderr is not one (a log file, a test), where the callers
print their own occasional lines instead of carriage-return redraws."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(**kwargs) -> tqdm:
    """``tqdm(**kwargs)`` on stderr, shown only on a terminal; usable as a context manager.
    ``bar.disable`` tells the caller whether it is shown."""
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=sys.stderr, **kwargs)


def bytes_bar(total: int, desc: str) -> tqdm:
    """A bar over ``total`` bytes (read or written), in MB/GB."""
    return progress_bar(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
