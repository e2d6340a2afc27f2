"""Convert between Megatron-LM ``torch_dist`` checkpoints and ours (``convert_checkpoint.py
--from megatron`` / ``--to megatron``).

From Megatron: the model's weights, at any of our layouts afterwards (our checkpoint is resharded
on load), as a weights-only checkpoint at iteration 0, with the model's options taken from the
run's ``args`` (or the tensors, or the flags given) and recorded, so ``--load`` names any flag that
differs. What is not carried over is named in the notes: the optimizer state (Megatron-LM's
distributed optimizer keeps it per gradient buffer in its default ``dp_reshardable`` format, which
does not map to parameters), the RNG states (another layout's), the data position, the iteration.

To Megatron: the weights of one of our checkpoints (any layout, any level) as a TP1 x PP1
torch_dist checkpoint that megatron-core's ``dist_checkpointing.load`` reads into a ``GPTModel``
of the same shape at any of its layouts, with the ``args`` Megatron-LM's loader reads.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from interop.checkpoint_tensors import CheckpointTensors, resolve_checkpoint
from interop.conversion_error import ConversionError
from interop.megatron_checkpoint import CHECKPOINT_VERSION, MegatronCheckpoint, find_checkpoint, write_checkpoint
from interop.megatron_mapping import (
    from_megatron,
    is_extra_state,
    megatron_args,
    model_args_from_megatron,
    padded_vocab_size,
    to_megatron,
    unread,
)
from interop.weights_checkpoint import weights_only_common, weights_only_layout, write_weights_checkpoint

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
"""The model's tensors among a Megatron checkpoint's (its optimizer's start with ``optimizer.``)."""


@dataclass(frozen=True)
class MegatronImport:
    source: str
    """The torch_dist checkpoint directory read."""
    checkpoint: str
    """Our ``iter_0000000`` directory written."""
    model_args: dict
    megatron_iteration: int | None
    dtype: torch.dtype
    weight_bytes: int
    notes: list[str] = field(default_factory=list)


def import_from_megatron(src: str, out_dir: str, given: dict[str, Any] | None = None, iteration: int | None = None,
                         trust_pickles: bool = False) -> MegatronImport:
    """Write ``out_dir/iter_0000000`` from the Megatron-LM checkpoint ``src`` (a save directory,
    its newest or ``iteration``, or one ``iter_N``). Everything is read and checked before
    anything is written."""
    directory = find_checkpoint(src, iteration)
    if directory is None:
        raise ConversionError(f"{src} is not a Megatron-LM torch_dist checkpoint: no metadata.json with sharded_backend "
                              "torch_dist in it, and no latest_checkpointed_iteration.txt pointing at one")
    source = MegatronCheckpoint(directory, trust_pickles=trust_pickles)
    model_args, notes = model_args_from_megatron(source.args, source.shapes, dict(given or {}))
    model_keys = sorted(k for k in source.shapes if k.startswith(MODEL_PREFIXES))
    skipped = [k for k in source.shapes if k not in model_keys] + [k for k in source.other_keys if not is_extra_state(k)]
    notes += unread(skipped)
    if any(k.startswith("optimizer") for k in skipped):
        notes.append("the optimizer state is not read (Megatron-LM's formats keep it per gradient buffer or per "
                     "parameter of its own layout): the checkpoint is weights only, train from it with --finetune "
                     "or --no-load-optim")
    if source.iteration:
        notes.append(f"Megatron-LM's iteration {source.iteration} is recorded as imported_iteration; the checkpoint "
                     "is at iteration 0 (a new run from these weights)")
    weights = from_megatron(source.read_tensors(model_keys), model_args)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"{out_dir} is not empty: import into a new checkpoint directory")
    os.makedirs(out_dir, exist_ok=True)
    dtypes = {t.dtype for t in weights.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    layout = weights_only_layout(model_args["num_layers"], dtype)
    common = weights_only_common(model_args, layout, {}, os.path.abspath(directory))
    common["imported_iteration"] = source.iteration
    result = write_weights_checkpoint(out_dir, weights, common, layout)
    return MegatronImport(directory, result.path, model_args, source.iteration, dtype,
                          sum(t.numel() * t.element_size() for t in weights.values()), notes)


@dataclass(frozen=True)
class MegatronExport:
    source: str
    checkpoint: str
    """The ``iter_N`` directory written."""
    iteration: int
    model_args: dict
    padded_vocab: int
    weight_bytes: int


def export_to_megatron(src: str, out_dir: str, iteration: int | None = None, verify: bool = True,
                       trust_pickles: bool = False) -> MegatronExport:
    """Write our checkpoint ``src`` (its newest committed, or ``iteration``) as
    ``out_dir/iter_<N>`` in Megatron-LM's torch_dist format."""
    path = resolve_checkpoint(src, iteration)
    ours = CheckpointTensors(path, verify=verify, trust_pickles=trust_pickles)
    model_args = ours.model_args
    weights = {key: ours.read(key) for key in ours.model_keys()}
    dtypes = {t.dtype for t in weights.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    padded = padded_vocab_size(model_args["vocab_size"], model_args.get("make_vocab_size_divisible_by") or 128)
    state = to_megatron(weights, model_args, padded)
    common = {"args": argparse.Namespace(**megatron_args(model_args, padded, ours.iteration, dtype)),
              "checkpoint_version": CHECKPOINT_VERSION, "iteration": ours.iteration,
              "num_floating_point_operations_so_far": 0,
              "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}
    written = write_checkpoint(out_dir, ours.iteration, state, common)
    return MegatronExport(path, written, ours.iteration, model_args, padded,
                          sum(t.numel() * t.element_size() for t in weights.values()))
