"""Read rectangles of global tensors out of a committed checkpoint: the resharding load.

A rank asks for :class:`TensorPiece` rectangles in its current layout. Each is assembled from
whichever stored chunks overlap it, whatever layout wrote them. Every chunk is read once, in
file order, and verified against its checksum before any of its bytes are used.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from checkpointing.errors import CheckpointCorruptError, CheckpointMismatchError
from checkpointing.items import TensorPiece
from checkpointing.metadata import read_metadata


def _rank_of(file_name: str) -> str:
    # DCP names files __{rank}_{n}.distcp
    return file_name[2:].split("_")[0] if file_name.startswith("__") else "?"


class CheckpointReader:
    """One committed checkpoint directory, opened for reading."""

    def __init__(self, directory: str, verify: bool = True):
        self.directory = directory
        self.verify = verify
        self.metadata = read_metadata(directory)
        self.facts = self.metadata.gpt_ckpt
        self.iteration: int = self.facts["iteration"]

    # -- raw chunks -----------------------------------------------------------------------------
    def _read_blob(self, key: str, index: MetadataIndex) -> bytes:
        info = self.metadata.storage_data[index]
        path = os.path.join(self.directory, info.relative_path)
        where = f"{path} (tensor {key}, written by rank {_rank_of(info.relative_path)})"
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"missing data file {where}") from None
        except OSError as error:
            raise CheckpointCorruptError(f"cannot read {where}: {error}") from error
        if len(blob) != info.length:
            raise CheckpointCorruptError(
                f"truncated data file {where}: {len(blob)} of {info.length} bytes at offset {info.offset}")
        if self.verify:
            expected = self.facts["checksums"].get((info.relative_path, info.offset))
            if expected is None or xxhash.xxh3_64_intdigest(blob) != expected:
                raise CheckpointCorruptError(f"checksum mismatch in {where} at offset {info.offset}")
        return blob

    @staticmethod
    def _decode(blob: bytes, where: str):
        try:
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        except Exception as error:  # torch.load raises many types on damaged bytes
            raise CheckpointCorruptError(f"cannot decode {where}: {error}") from error

    # -- small objects ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def read_object(self, key: str) -> Any:
        if key not in self.metadata.state_dict_metadata:
            raise CheckpointCorruptError(f"{self.directory} has no item {key!r}")
        return self._decode(self._read_blob(key, MetadataIndex(key)), f"item {key} of {self.directory}")

    def tensor_keys(self) -> set[str]:
        return {k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    # -- tensors ----------------------------------------------------------------------------------
    def read_pieces(self, pieces: list[TensorPiece], arrays: dict[str, torch.Tensor]) -> int:
        """Fill every piece of ``arrays`` from the checkpoint; returns the bytes read.

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
            if tuple(meta.size) != tuple(piece.global_shape):
                raise CheckpointMismatchError(
                    f"{piece.key}: checkpoint {self.directory} has shape {tuple(meta.size)}, this model "
                    f"{tuple(piece.global_shape)}; the model flags differ from the saved run's")
            for chunk in meta.chunks:
                if _overlap(piece.global_offset, piece.shape, chunk.offsets, chunk.sizes) is not None:
                    wanted[(piece.key, tuple(chunk.offsets))].append(piece)
        order = sorted(wanted, key=lambda k: (self.metadata.storage_data[MetadataIndex(k[0], k[1])].relative_path,
                                              self.metadata.storage_data[MetadataIndex(k[0], k[1])].offset))
        total = 0
        for key, offsets in order:
            index = MetadataIndex(key, offsets)
            blob = self._read_blob(key, index)
            total += len(blob)
            chunk = self._decode(blob, f"chunk {offsets} of {key} in {self.directory}")
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


def _overlap(a_off, a_size, b_off, b_size):
    """Per-dimension [lo, hi) of the intersection of two rectangles, or None."""
    region = []
    for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if lo >= hi:
            return None
        region.append((lo, hi))
    return tuple(region)
