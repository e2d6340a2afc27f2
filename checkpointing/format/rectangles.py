"""Rectangles of one global tensor: the tiling check of a save and the overlap index of a load.

Both stand on one sweep: sort the rectangles by their start along one axis; a rectangle can only
meet those whose interval along that axis is still open when it starts. Comparing every pair
(what the tiling check did) is quadratic in the chunks of a key: 101 s for a 70B model's 531k
records. The axis is the one with the most distinct starts (optimizer shards cut parameters by
rows, so dim 0 for most keys): then few intervals are open at once, and the cost is
O(n log n + n x open). The answer never depends on the axis, only the speed does.
"""

from __future__ import annotations

import bisect
import heapq
import math
from typing import Sequence


class TilingError(ValueError):
    """The gathered chunks do not cover a global tensor exactly once (a bug, never committed)."""


def overlap(a_off: Sequence[int], a_size: Sequence[int], b_off: Sequence[int], b_size: Sequence[int]):
    """Per-dimension [lo, hi) of the intersection of two rectangles, or None."""
    region = []
    for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if lo >= hi:
            return None
        region.append((lo, hi))
    return tuple(region)


def _sweep_axis(offsets: Sequence[Sequence[int]]) -> int:
    """The axis along which the rectangles' starts are most spread (fewest open at once)."""
    ndim = len(offsets[0])
    return max(range(ndim), key=lambda d: len({o[d] for o in offsets}))


def check_tiling(key: str, global_shape: tuple[int, ...], offsets: Sequence[tuple[int, ...]],
                 sizes: Sequence[tuple[int, ...]], ranks: Sequence[int], complete: bool = True) -> None:
    """Raise :class:`TilingError` unless the rectangles lie inside ``global_shape``, overlap
    nowhere and cover it exactly once (no overlap and a total volume equal to the tensor's: no gap).
    ``ranks`` name the writers in the messages. ``complete`` False: a part of the tensor (one
    node's ranks' chunks on a node-local level), checked for bounds and overlaps, not for gaps."""
    total = 0
    for off, size, rank in zip(offsets, sizes, ranks):
        if any(o < 0 or s < 0 or o + s > g for o, s, g in zip(off, size, global_shape)):
            raise TilingError(f"{key}: chunk at {off} of {size} from rank {rank} exceeds {global_shape}")
        total += math.prod(size)
    if not global_shape:  # a scalar: any two chunks are the same element
        if len(offsets) > 1:
            raise TilingError(f"{key}: chunks of rank {ranks[0]} and rank {ranks[1]} overlap at () / ()")
    elif offsets:
        axis = _sweep_axis(offsets)
        order = sorted(range(len(offsets)), key=lambda i: offsets[i][axis])
        open_: list[tuple[int, int]] = []  # (end along the axis, index), a heap
        for i in order:
            start = offsets[i][axis]
            while open_ and open_[0][0] <= start:
                heapq.heappop(open_)
            for _, j in open_:
                if overlap(offsets[i], sizes[i], offsets[j], sizes[j]) is not None:
                    a, b = sorted((i, j))
                    raise TilingError(f"{key}: chunks of rank {ranks[a]} and rank {ranks[b]} overlap at "
                                      f"{offsets[a]} / {offsets[b]}")
            if sizes[i][axis] > 0:
                heapq.heappush(open_, (start + sizes[i][axis], i))
    if complete and total != math.prod(global_shape):
        raise TilingError(f"{key}: chunks cover {total} of {math.prod(global_shape)} elements")


class RectangleIndex:
    """The rectangles of one key, sorted along one axis, to find those a query overlaps without
    looking at the others (a load's planning: every piece of a rank against the stored chunks)."""

    def __init__(self, offsets: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]):
        self.offsets, self.sizes = offsets, sizes
        self.axis = _sweep_axis(offsets) if offsets and offsets[0] else None
        if self.axis is None:
            self.order = list(range(len(offsets)))
            return
        self.order = sorted(range(len(offsets)), key=lambda i: offsets[i][self.axis])
        self.starts = [offsets[i][self.axis] for i in self.order]
        self.longest = max((s[self.axis] for s in sizes), default=0)
        """No rectangle starting before ``query start - longest`` reaches the query."""

    def overlapping(self, offset: Sequence[int], size: Sequence[int]) -> list[int]:
        """Indices (into the rectangles given) of those that overlap the query, in sorted order."""
        if self.axis is None:
            candidates = self.order
        else:
            lo = bisect.bisect_right(self.starts, offset[self.axis] - self.longest)
            hi = bisect.bisect_left(self.starts, offset[self.axis] + size[self.axis])
            candidates = self.order[lo:hi]
        # in the order given: a load reads its chunks in the metadata's order, as it did by a scan
        return sorted(i for i in candidates if overlap(offset, size, self.offsets[i], self.sizes[i]) is not None)
