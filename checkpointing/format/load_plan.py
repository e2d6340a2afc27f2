"""Which stored chunks a rank's pieces need: the planning half of a resharding load.

A piece is assembled from the stored chunks of its key that overlap it. Scanning every chunk of
the key for every piece costs pieces x chunks, quadratic where a key has thousands of chunks
(small optimizer shards, or a layout that cuts each parameter over every DP rank). The chunks of
such a key are indexed once (``checkpointing.format.rectangles.RectangleIndex``, sorted along one axis)
when a piece first asks for the key; a piece then looks at the few chunks near it. The chunks
found, and their order, are those of the scan.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from checkpointing.base.errors import CheckpointMismatchError
from checkpointing.format.items import TensorPiece
from checkpointing.format.rectangles import RectangleIndex, overlap

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata


INDEX_MIN_CHUNKS = 64
"""Keys with fewer stored chunks are scanned: sorting costs more than it saves there (the ZeRO
shards of ``benchmarks/scale.py``'s cases give most keys a few dozen chunks, even at 16k ranks)."""


class ChunkIndex:
    """The stored chunks of every tensor of one checkpoint's metadata, indexed on first use."""

    def __init__(self, metadata: Metadata):
        self.metadata = metadata
        self._by_key: dict[str, RectangleIndex] = {}

    def overlapping(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> list:
        """The ``ChunkStorageMetadata`` of ``key`` that overlap the rectangle, in stored order."""
        chunks = self.metadata.state_dict_metadata[key].chunks
        if len(chunks) < INDEX_MIN_CHUNKS:
            return [c for c in chunks if overlap(offset, shape, c.offsets, c.sizes) is not None]
        index = self._by_key.get(key)
        if index is None:
            index = self._by_key[key] = RectangleIndex([tuple(c.offsets) for c in chunks],
                                                       [tuple(c.sizes) for c in chunks])
        return [chunks[i] for i in index.overlapping(offset, shape)]


def wanted_chunks(metadata: Metadata, index: ChunkIndex, pieces: list[TensorPiece], longer_rows: frozenset[str],
                  directory: str) -> tuple[dict, dict]:
    """(wanted, sizes): the pieces each stored chunk fills, by (key, chunk offsets), and each such
    chunk's stored shape. Raises :class:`CheckpointMismatchError` for a missing tensor or another
    global shape (``longer_rows``: keys that may have more stored rows, see the reader)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sdm = metadata.state_dict_metadata
    wanted: dict[tuple[str, tuple[int, ...]], list[TensorPiece]] = defaultdict(list)
    sizes: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
    for piece in pieces:
        meta = sdm.get(piece.key)
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointMismatchError(
                f"{directory} has no tensor {piece.key}: it was saved from another model "
                f"(layers {metadata.gpt_ckpt['layout'].get('num_layers', '?')}) or without optimizer state; "
                "use the matching model flags, or --no-load-optim for a weights-only checkpoint")
        stored, wanted_shape = tuple(meta.size), tuple(piece.global_shape)
        padded = (piece.key in longer_rows and len(stored) == len(wanted_shape) and stored[1:] == wanted_shape[1:]
                  and stored[0] >= wanted_shape[0])
        if stored != wanted_shape and not padded:
            raise CheckpointMismatchError(
                f"{piece.key}: checkpoint {directory} has shape {tuple(meta.size)}, this model "
                f"{tuple(piece.global_shape)}; the model flags differ from the saved run's")
        for chunk in index.overlapping(piece.key, piece.global_offset, piece.shape):
            wanted[(piece.key, tuple(chunk.offsets))].append(piece)
            sizes[(piece.key, tuple(chunk.offsets))] = tuple(chunk.sizes)
    return wanted, sizes
