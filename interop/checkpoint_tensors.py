"""A committed checkpoint read one whole global tensor at a time, through ``CheckpointReader``
(every chunk's checksum verified), whatever layout and level wrote it.

Format 1 stored the vocabulary tensors (and their optimizer state) with Megatron's padded rows,
format 2 the true rows; either way a tensor comes back with the true vocabulary's rows only
(``common["args"]["model"]["vocab_size"]``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpointing.base import CheckpointError, CheckpointNotFoundError
from checkpointing.format import METADATA_NAME, CheckpointReader, TensorPiece, keys, list_checkpoints, load_candidates
from models.vocab import VOCAB_PARAMS, true_vocab_rows


class CheckpointFormatError(CheckpointError):
    """A committed checkpoint lacks what a reader outside training needs (its run's arguments)."""


def _vocab_param(key: str) -> str:
    """The model parameter a tensor key belongs to (``optimizer.state.exp_avg.X`` -> ``X``)."""
    if keys.is_optimizer_key(key):
        return key[len(keys.OPTIMIZER_STATE_PREFIX):].split(".", 1)[1]
    return key


@dataclass(frozen=True)
class TensorInfo:
    """One global tensor of a checkpoint as it is read back."""

    key: str
    shape: tuple[int, ...]
    """Global shape, with the true vocabulary's rows for a vocabulary tensor."""
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointTensors:
    """One committed ``iter_N`` directory, opened for reading whole tensors."""

    def __init__(self, directory: str, verify: bool = True, trust_pickles: bool = False):
        self.reader = CheckpointReader(directory, verify=verify, trust_pickles=trust_pickles)
        self.directory = directory
        self.iteration = self.reader.iteration
        self.common: dict[str, Any] = self.reader.read_object(keys.COMMON)
        try:
            self.model_args: dict[str, Any] = dict(self.common["args"]["model"])
            self.vocab_size: int = int(self.model_args["vocab_size"])
        except (KeyError, TypeError):
            raise CheckpointFormatError(
                f"{directory}: its common state records no model arguments (args.model.vocab_size); "
                "it was not written by this trainer") from None
        self._sdm = self.reader.metadata.state_dict_metadata
        tensor_keys = self.reader.tensor_keys()
        self._longer = self.reader.padded_rows_allowed(
            frozenset(k for k in tensor_keys if _vocab_param(k) in VOCAB_PARAMS))
        self.infos: dict[str, TensorInfo] = {}
        for key in sorted(tensor_keys):
            meta: TensorStorageMetadata = self._sdm[key]
            shape = tuple(meta.size)
            rows = true_vocab_rows(_vocab_param(key), self.vocab_size)
            if rows is not None and shape[0] != rows:
                if key not in self._longer or shape[0] < rows:
                    raise CheckpointFormatError(
                        f"{directory}: {key} has {shape[0]} rows, the vocabulary {rows} (format "
                        f"{self.reader.facts.get('format_version', 1)} stores the true rows)")
                shape = (rows, *shape[1:])
            self.infos[key] = TensorInfo(key, shape, meta.properties.dtype)

    @property
    def args(self) -> dict[str, Any]:
        """The saving run's arguments (``dataclasses.asdict`` of its job configuration)."""
        return self.common.get("args", {})

    def model_keys(self) -> list[str]:
        """The model's weights (no optimizer state), sorted."""
        return [k for k in self.infos if not keys.is_optimizer_key(k)]

    def optimizer_keys(self, array: str) -> list[str]:
        """The optimizer's ``array`` (``fp32_param``, ``exp_avg``, ``exp_avg_sq``) per parameter."""
        prefix = keys.optimizer_key(array, "")
        return [k for k in self.infos if k.startswith(prefix)]

    def read(self, key: str) -> torch.Tensor:
        """The whole global tensor ``key`` (true vocabulary rows), in its stored dtype."""
        info = self.infos[key]
        out = torch.empty(math.prod(info.shape), dtype=info.dtype)
        piece = TensorPiece(key=key, array="out", start=0, shape=info.shape, global_shape=info.shape,
                            global_offset=(0,) * len(info.shape))
        self.reader.read_pieces([piece], {"out": out}, self._longer)
        return out.view(info.shape)


def committed_iterations(root: str) -> list[str]:
    """The ``iter_N`` directories of a level directory that are committed, oldest first."""
    return [c.path for c in list_checkpoints(root) if c.committed]


def resolve_checkpoint(path: str, iteration: int | None = None) -> str:
    """The ``iter_N`` directory to read: ``path`` itself if it is one, else the one of
    ``iteration`` in the level directory ``path``, else its newest committed one (the tracker's,
    as ``--load`` picks)."""
    if os.path.isfile(os.path.join(path, METADATA_NAME)):
        if iteration is not None:
            raise CheckpointNotFoundError(f"{path} is one checkpoint already; --iteration is for a checkpoint "
                                          "directory holding iter_* folders")
        return path
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path} does not exist")
    found, _ = load_candidates(path, iteration)
    if not found:
        held = [os.path.basename(c.path) for c in list_checkpoints(path) if c.committed]
        what = f"iteration {iteration}" if iteration is not None else "a checkpoint"
        raise CheckpointNotFoundError(f"{path} holds no committed {what}; committed: {held or 'none'}")
    return found[0].path
