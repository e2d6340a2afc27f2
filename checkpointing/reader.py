"""Read rectangles of global tensors out of a committed checkpoint: the resharding load.

A rank asks for :class:`TensorPiece` rectangles in its current layout. Each is assembled from
whichever stored chunks overlap it, whatever layout wrote them. Every chunk is read once, in
file order, and verified against its checksum before any of its bytes are used.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from checkpointing.errors import CheckpointCorruptError, CheckpointMismatchError
from checkpointing.items import TensorPiece
from checkpointing.metadata import read_metadata
from checkpointing.safe_pickle import load_objects


def _rank_of(file_name: str) -> str:
    # DCP names files __{rank}_{n}.distcp
    return file_name[2:].split("_")[0] if file_name.startswith("__") else "?"


class CheckpointReader:
    """One committed checkpoint directory, opened for reading."""

    def __init__(self, directory: str, verify: bool = True, trust_pickles: bool = False):
        """``trust_pickles``: read pickles that need more than data classes (a checkpoint of an
        older format, or a tampered one) with full unpickling; see ``checkpointing.safe_pickle``."""
        self.directory = directory
        self.verify = verify
        self.trust_pickles = trust_pickles
        self.metadata = read_metadata(directory, trust_pickles)
        self.full_unpickling: bool = self.metadata.gpt_ckpt_full_unpickling
        """Whether reading needed full unpickling so far (only with ``trust_pickles``)."""
        self.facts = self.metadata.gpt_ckpt
        self.iteration: int = self.facts["iteration"]

    # -- raw chunks -----------------------------------------------------------------------------
    def _read_blob(self, key: str, index: MetadataIndex) -> bytes:
        info = self.metadata.storage_data[index]
        return self._read_range(key, info.relative_path, info.offset, info.length)

    def _read_range(self, key: str, relative_path: str, offset: int, length: int) -> bytes:
        path = os.path.join(self.directory, relative_path)
        where = f"{path} (tensor {key}, written by rank {_rank_of(relative_path)})"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                blob = f.read(length)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"missing data file {where}") from None
        except OSError as error:
            raise CheckpointCorruptError(f"cannot read {where}: {error}") from error
        if len(blob) != length:
            raise CheckpointCorruptError(
                f"truncated data file {where}: {len(blob)} of {length} bytes at offset {offset}")
        if self.verify:
            expected = self.facts["checksums"].get((relative_path, offset))
            if expected is None or xxhash.xxh3_64_intdigest(blob) != expected:
                raise CheckpointCorruptError(f"checksum mismatch in {where} at offset {offset}")
        return blob

    def _decode(self, blob: bytes, where: str):
        value, trusted = load_objects(blob, where, self.trust_pickles)
        self.full_unpickling |= trusted
        return value

    # -- small objects ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def object_file(self, key: str) -> str | None:
        """The data file that holds byte item ``key`` (None: not in this checkpoint)."""
        info = self.metadata.storage_data.get(MetadataIndex(key))
        return info.relative_path if info is not None else None

    def read_object(self, key: str) -> Any:
        if key not in self.metadata.state_dict_metadata:
            raise CheckpointCorruptError(f"{self.directory} has no item {key!r}")
        return self._decode(self._read_blob(key, MetadataIndex(key)), f"item {key} of {self.directory}")

    def tensor_keys(self) -> set[str]:
        return {k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    # -- tensors ----------------------------------------------------------------------------------
    def padded_rows_allowed(self, keys: frozenset[str]) -> frozenset[str]:
        """Of ``keys`` (tensors with a padded vocabulary dimension), those this checkpoint may
        store with more rows than the true vocabulary: all of them in format 1, none after."""
        return keys if self.facts.get("format_version", 1) < 2 else frozenset()

    def read_pieces(self, pieces: list[TensorPiece], arrays: dict[str, torch.Tensor],
                    longer_rows: frozenset[str] = frozenset()) -> int:
        """Fill every piece of ``arrays`` from the checkpoint; returns the bytes read.

        ``longer_rows``: keys whose stored tensor may have more rows than the piece's global
        shape (a format-1 checkpoint's padded vocabulary, see :meth:`padded_rows_allowed`); the
        extra rows are not read.

        Raises :class:`CheckpointMismatchError` if a tensor is missing or has another global
        shape, and :class:`CheckpointCorruptError` if a chunk is damaged.
        """
        sdm = self.metadata.state_dict_metadata
        wanted: dict[tuple[str, tuple[int, ...]], list[TensorPiece]] = defaultdict(list)
        covered = {id(p): 0 for p in pieces}
        for piece in pieces:
            meta = sdm.get(piece.key)
            if not isinstance(meta, TensorStorageMetadata):
                raise CheckpointMismatchError(
                    f"{self.directory} has no tensor {piece.key}: it was saved from another model "
                    f"(layers {self.facts['layout'].get('num_layers', '?')}) or without optimizer state; "
                    "use the matching model flags, or --no-load-optim for a weights-only checkpoint")
            stored, wanted_shape = tuple(meta.size), tuple(piece.global_shape)
            padded = (piece.key in longer_rows and len(stored) == len(wanted_shape) and stored[1:] == wanted_shape[1:]
                      and stored[0] >= wanted_shape[0])
            if stored != wanted_shape and not padded:
                raise CheckpointMismatchError(
                    f"{piece.key}: checkpoint {self.directory} has shape {tuple(meta.size)}, this model "
                    f"{tuple(piece.global_shape)}; the model flags differ from the saved run's")
            for chunk in meta.chunks:
                if _overlap(piece.global_offset, piece.shape, chunk.offsets, chunk.sizes) is not None:
                    wanted[(piece.key, tuple(chunk.offsets))].append(piece)
        def where(k):
            info = self.metadata.storage_data[MetadataIndex(*k)]
            return info.relative_path, info.offset

        total = 0
        last: tuple[tuple[str, int], torch.Tensor] | None = None
        for key, offsets in sorted(wanted, key=where):
            if last is not None and last[0] == where((key, offsets)):
                chunk = last[1]  # two keys over one blob (fp32 weights = main weights): read once
            else:
                blob = self._read_blob(key, MetadataIndex(key, offsets))
                total += len(blob)
                chunk = self._decode(blob, f"chunk {offsets} of {key} in {self.directory}")
                last = (where((key, offsets)), chunk)
            for piece in wanted[(key, offsets)]:
                region = _overlap(piece.global_offset, piece.shape, offsets, tuple(chunk.shape))
                src = chunk[tuple(slice(a - o, b - o) for (a, b), o in zip(region, offsets))]
                dst = piece.view(arrays)[tuple(slice(a - o, b - o) for (a, b), o in zip(region, piece.global_offset))]
                dst.copy_(src)
                covered[id(piece)] += src.numel()
        for piece in pieces:
            if covered[id(piece)] != piece.numel:
                raise CheckpointCorruptError(
                    f"{piece.key}: the chunks in {self.directory} cover {covered[id(piece)]} of the "
                    f"{piece.numel} elements at {piece.global_offset}")
        return total


    @property
    def local_files(self) -> list[str] | None:
        """On a node-local level: the data files this node's directory holds; else None."""
        return self.facts.get("local_files")

    def read_own_pieces(self, file_name: str, pieces: list[TensorPiece], arrays: dict[str, torch.Tensor],
                        longer_rows: frozenset[str] = frozenset()) -> int:
        """Fill ``pieces`` from ``file_name`` alone: the pieces that rank saved itself, replicas
        included (a node-local level, read back in the saving layout). Returns the bytes read.
        ``longer_rows``: as in :meth:`read_pieces` (a stored chunk may hold padded rows after
        the piece's)."""
        replicas = self.facts.get("replicas") or {}
        total = 0
        for piece in pieces:
            offsets = tuple(piece.global_offset)
            info = self.metadata.storage_data.get(MetadataIndex(piece.key, offsets))
            if info is not None and info.relative_path == file_name and info.length:
                offset, length = info.offset, info.length
            elif (file_name, piece.key, offsets) in replicas:
                offset, length = replicas[(file_name, piece.key, offsets)]
            else:
                raise CheckpointCorruptError(
                    f"{os.path.join(self.directory, file_name)} holds no copy of {piece.key} at {offsets}; "
                    "was it saved in another layout?")
            blob = self._read_range(piece.key, file_name, offset, length)
            total += len(blob)
            chunk = self._decode(blob, f"chunk {offsets} of {piece.key} in {self.directory}")
            if piece.key in longer_rows and chunk.dim() == len(piece.shape) and chunk.shape[0] > piece.shape[0]:
                chunk = chunk[: piece.shape[0]]  # format 1: the padded vocabulary rows follow
            if tuple(chunk.shape) != tuple(piece.shape):
                raise CheckpointCorruptError(f"{piece.key} at {offsets} in {self.directory}: stored shape "
                                             f"{tuple(chunk.shape)}, expected {tuple(piece.shape)}")
            piece.view(arrays).copy_(chunk)
        return total


def _overlap(a_off, a_size, b_off, b_size):
    """Per-dimension [lo, hi) of the intersection of two rectangles, or None."""
    region = []
    for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if lo >= hi:
            return None
        region.append((lo, hi))
    return tuple(region)
