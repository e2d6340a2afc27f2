"""Megatron-LM ``--ckpt-format torch_dist`` checkpoints, read and written without megatron-core.

Such a checkpoint is what megatron-core's ``dist_checkpointing.save`` writes: a directory
(``SAVE/iter_0000010/``, ``SAVE/release/``) holding stock ``torch.distributed.checkpoint`` files
(``.metadata``, ``__<rank>_<n>.distcp``), ``common.pt`` (the items every rank shares: Megatron-LM's
``args``, ``iteration``, ``checkpoint_version``...) and ``metadata.json`` (``sharded_backend:
torch_dist``), next to ``SAVE/latest_checkpointed_iteration.txt``.

Reading trusts nothing in it: ``.metadata`` goes through the restricted DCP unpickler, ``common.pt``
through ``torch.load(weights_only=True)`` with ``argparse.Namespace`` admitted (what Megatron-LM
puts there besides builtins), every data file is checked to hold the bytes the metadata says it
does before a byte is read, and only tensors are read (the per-module ``_extra_state`` items are
pickles: never loaded). ``--trust-checkpoint-pickles`` lets a ``common.pt`` that needs more be
read, for checkpoints the user wrote.

Writing makes what Megatron-LM's loader reads: the stacked tensors under megatron-core's keys,
each layer module's ``_extra_state``, ``common.pt`` with ``args`` as an ``argparse.Namespace``,
``metadata.json`` and the tracker; into a temporary directory renamed into place at the end, so a
failure leaves nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from checkpointing.base import (
    TRACKER_NAME,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    load_dcp_metadata,
    load_objects,
)
from checkpointing.format import MEGATRON_METADATA_JSON, is_megatron_torch_dist

COMMON_NAME = "common.pt"
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}
"""What megatron-core writes in ``metadata.json`` for a torch_dist checkpoint."""
CHECKPOINT_VERSION = 3.0
"""Megatron-LM's ``checkpoint_version`` of the checkpoints it writes today."""


def is_megatron_checkpoint(path: str) -> bool:
    """True if ``path`` is a Megatron torch_dist checkpoint directory or a save directory whose
    tracker points at one."""
    try:
        return find_checkpoint(path) is not None
    except CheckpointError:
        return False


def find_checkpoint(path: str, iteration: int | None = None) -> str | None:
    """The checkpoint directory ``path`` names: itself if it holds ``metadata.json`` of a
    torch_dist checkpoint, else the one the save directory's tracker (or ``iteration``) points at.
    None: not a Megatron checkpoint. Raises :class:`CheckpointNotFoundError` where the tracker
    points at nothing."""
    if iteration is None and is_megatron_torch_dist(path):
        return path
    tracker = os.path.join(path, TRACKER_NAME)
    if iteration is not None:
        name = f"iter_{iteration:07d}"
    elif os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None:
            raise CheckpointNotFoundError(f"{tracker} holds {text!r}, not an iteration or 'release'")
    else:
        return None
    candidate = os.path.join(path, name)
    if is_megatron_torch_dist(candidate):
        return candidate
    if os.path.isdir(candidate) or iteration is not None:
        raise CheckpointNotFoundError(f"{candidate} is not a Megatron torch_dist checkpoint (no {MEGATRON_METADATA_JSON} "
                                      "with sharded_backend torch_dist)")
    return None


@dataclass
class MegatronCheckpoint:
    """One torch_dist checkpoint directory, opened for reading (metadata and ``common.pt`` read
    and checked; tensors on :meth:`read_tensors`)."""

    directory: str
    trust_pickles: bool = False
    common: dict[str, Any] = field(init=False)
    shapes: dict[str, tuple[int, ...]] = field(init=False)
    """Every tensor's global shape, by key."""
    other_keys: list[str] = field(init=False)
    """Items that are not tensors (``_extra_state``, ``rng_state``...): never read."""

    def __post_init__(self) -> None:
        metadata_path = os.path.join(self.directory, ".metadata")
        try:
            with open(metadata_path, "rb") as f:
                self.metadata, _ = load_dcp_metadata(f, metadata_path, self.trust_pickles)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{metadata_path} is missing: not a complete torch_dist checkpoint") from None
        except CheckpointError:
            raise
        except Exception as error:  # pickle raises many types on damaged bytes
            raise CheckpointCorruptError(f"{metadata_path} cannot be read: {error}") from None
        self.shapes, self.other_keys = {}, []
        for key, meta in self.metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                self.shapes[key] = tuple(meta.size)
            elif isinstance(meta, BytesStorageMetadata):
                self.other_keys.append(key)
        self.common = self._read_common()
        self._check_data_files()

    @property
    def args(self) -> dict[str, Any] | None:
        """Megatron-LM's ``args`` as a dict (None: a model-only save)."""
        args = self.common.get("args")
        return vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None

    @property
    def iteration(self) -> int | None:
        value = self.common.get("iteration")
        return value if isinstance(value, int) else None

    def _read_common(self) -> dict[str, Any]:
        path = os.path.join(self.directory, COMMON_NAME)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path} is missing: megatron-core writes it with every checkpoint") from None
        common, _ = load_objects(blob, path, self.trust_pickles, allowed=(argparse.Namespace,))
        if not isinstance(common, dict):
            raise CheckpointCorruptError(f"{path} holds a {type(common).__name__}, not the dict megatron-core writes")
        return common

    def _check_data_files(self) -> None:
        """Every data file holds the bytes the metadata places in it: a truncated or missing one is
        named before anything is read."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            path = os.path.join(self.directory, name)
            try:
                have = os.stat(path).st_size
            except FileNotFoundError:
                raise CheckpointCorruptError(f"{path} is missing; the checkpoint's metadata places data in it") from None
            if have < size:
                raise CheckpointCorruptError(f"{path} is truncated: {have} bytes, the metadata places data up to byte "
                                             f"{size}")

    def read_tensors(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Whole global tensors (``keys``, default all), read by stock DCP in this process."""
        wanted = sorted(self.shapes) if keys is None else keys
        state = {key: torch.empty(self.shapes[key], dtype=self.metadata.state_dict_metadata[key].properties.dtype)
                 for key in wanted}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=_CheckedReader(self.directory, self.metadata), no_dist=True)
        except BaseException as error:  # DCP's CheckpointException derives from BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointCorruptError(f"{self.directory}: reading its tensors failed: {_first_line(error)}") from None
        return state


class _CheckedReader(FileSystemReader):
    """DCP's reader with the metadata already read by the restricted unpickler (its own would
    unpickle the file with ``pickle.load``)."""

    def __init__(self, path: str, metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self):
        return self._metadata


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def write_checkpoint(save_dir: str, iteration: int, state: dict[str, Any], common: dict[str, Any]) -> str:
    """Write ``state`` (megatron-core keys -> tensors, ``_extra_state`` lists) as
    ``save_dir/iter_<iteration>`` with ``common.pt``, ``metadata.json`` and the tracker; returns
    the checkpoint directory. Built in a temporary directory beside it and renamed into place."""
    os.makedirs(save_dir, exist_ok=True)
    final = os.path.join(save_dir, f"iter_{iteration:07d}")
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists: write into a new directory")
    building = tempfile.mkdtemp(prefix=".building-", dir=save_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(building, 0o777 & ~umask)  # a directory as os.makedirs makes it (mkdtemp's is 0700)
    try:
        with warnings.catch_warnings():  # as in read_tensors: one process, on purpose
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=FileSystemWriter(building), no_dist=True)
        buffer = io.BytesIO()
        torch.save(common, buffer)
        with open(os.path.join(building, COMMON_NAME), "wb") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(building, MEGATRON_METADATA_JSON), "w") as f:
            json.dump(METADATA_JSON, f)
        os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    tracker = os.path.join(save_dir, TRACKER_NAME)
    with open(tracker + ".tmp", "w") as f:
        f.write(str(iteration))
    os.replace(tracker + ".tmp", tracker)
    return final
