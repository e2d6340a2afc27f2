"""Export one committed checkpoint (any layout, any level) to a ``transformers`` directory,
GPT-2 (``GPT2LMHeadModel``) or Llama (``LlamaForCausalLM``) by the options the run trained with:
``config.json``, safetensors weights and the run's tokenizer files.

Tensors are read one at a time through ``CheckpointReader`` (checksums verified) and written in
safetensors shards of at most ``max_shard_bytes``, so memory holds one shard, not the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from interop import gpt2_mapping, llama_mapping
from interop.checkpoint_tensors import CheckpointTensors
from interop.conversion_error import ConversionError
from interop.hf_tokenizer_files import export_tokenizer
from trainer.progress import bytes_bar

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ExportConfig:
    """What ``convert_checkpoint.py --to hf`` was asked for."""

    checkpoint: str
    """The ``iter_N`` directory to export (``interop.checkpoint_tensors.resolve_checkpoint``)."""
    out_dir: str
    """The ``transformers`` model directory to write; must be new or empty."""
    vocab_file: str | None = None
    """The run's ``--vocab-file`` when it is no longer where the checkpoint recorded it."""
    merge_file: str | None = None
    """The run's ``--merge-file``, likewise."""
    tokenizer_model: str | None = None
    """The run's ``--tokenizer-model`` directory (``HuggingFaceTokenizer``), likewise."""
    activation: str | None = None
    """GPT-2's ``activation_function``; None: what the run computed (``gpt2_mapping.activation_of``).
    A Llama export refuses it (its MLP is SwiGLU)."""
    max_shard_bytes: int = 5 * 2**30
    """Largest safetensors file; more weights than this go into numbered shards with an index."""
    verify: bool = True
    """Verify every chunk's checksum (``--no-verify-checkpoint-checksums`` turns it off)."""
    trust_pickles: bool = False
    """Read the small objects of an older checkpoint format with full unpickling."""


@dataclass(frozen=True)
class ExportResult:
    architecture: str
    """``GPT2LMHeadModel`` or ``LlamaForCausalLM``."""
    iteration: int
    layout: dict
    config: dict
    files: list[str]
    """Weight files written (one, or the shards)."""
    weight_bytes: int
    tokenizer_type: str
    tokenizer_files: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _prepare_out_dir(out_dir: str) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"{out_dir} is not empty: export into a new directory (nothing is overwritten)")
    os.makedirs(out_dir, exist_ok=True)


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive keys grouped into files of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


@dataclass(frozen=True)
class _Family:
    """One ``transformers`` architecture's side of the export."""

    name: str
    names_of: Callable[[str], tuple[str, ...]]
    """Its names of one of our tensors."""
    to_hf: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]
    all_names: set[str]
    """Every weight the architecture needs."""
    config: Callable[[torch.dtype, int | None], tuple[dict, list[str]]]
    """(``config.json``, notes) given the weights' dtype and the end-of-document id."""


def _family(ckpt: CheckpointTensors, activation: str | None) -> _Family:
    """Llama if the run used any Llama-only option (RoPE, RMSNorm, SwiGLU, grouped-query
    attention, no biases), else GPT-2; each refuses what it cannot express."""
    model_args = ckpt.model_args
    if llama_mapping.is_llama(model_args):
        if activation is not None:
            raise ConversionError(f"--activation {activation} is GPT-2's: this model is Llama-style (a SwiGLU MLP)")
        llama_mapping.check_expressible(model_args)
        shape = llama_mapping.shape_of(model_args)
        return _Family("LlamaForCausalLM", lambda key: llama_mapping.hf_names_of(key, shape),
                       lambda key, t: llama_mapping.to_hf(key, t, shape), llama_mapping.hf_names(shape),
                       lambda dtype, eod: llama_mapping.hf_config(model_args, dtype, eod))
    gpt2_mapping.check_expressible(model_args)
    shape = gpt2_mapping.shape_of(model_args)
    computed, note = gpt2_mapping.activation_of(ckpt.args.get("training", {}), ckpt.common.get("device"))
    if activation is not None:
        computed, note = activation, None
    return _Family("GPT2LMHeadModel", lambda key: (gpt2_mapping.hf_name(key, shape),),
                   lambda key, t: [gpt2_mapping.to_hf(key, t, shape)], gpt2_mapping.hf_names(shape),
                   lambda dtype, eod: (gpt2_mapping.hf_config(model_args, computed, dtype, eod), [note] if note else []))


def export_to_hf(cfg: ExportConfig) -> ExportResult:
    """Write the checkpoint as a ``transformers`` model directory; raises
    :class:`~interop.conversion_error.ConversionError` (what the architecture cannot express, or
    missing tokenizer files) or a ``checkpointing.base.errors.CheckpointError`` (a damaged or foreign
    checkpoint)."""
    from safetensors.torch import save_file

    ckpt = CheckpointTensors(cfg.checkpoint, verify=cfg.verify, trust_pickles=cfg.trust_pickles)
    family = _family(ckpt, cfg.activation)
    keys = ckpt.model_keys()
    names = {key: family.names_of(key) for key in keys}
    flat = [n for ns in names.values() for n in ns]
    if len(set(flat)) < len(flat):
        raise ConversionError(f"{cfg.checkpoint} holds two tensors for one {family.name} weight (both spellings of a "
                              "layer norm?): " + ", ".join(sorted(names)))
    missing = sorted(family.all_names - set(flat))
    if missing:
        raise ConversionError(f"{cfg.checkpoint} lacks weights {family.name} needs: {missing[:4]} "
                              f"({len(missing)} in all)")
    dtypes = {ckpt.infos[k].dtype for k in keys}
    if len(dtypes) > 1:
        raise ConversionError(f"{cfg.checkpoint} stores its weights in several dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()

    _prepare_out_dir(cfg.out_dir)
    tokenizer = export_tokenizer(ckpt.args, ckpt.vocab_size, cfg.out_dir, ckpt.model_args["max_position_embeddings"],
                                 cfg.vocab_file, cfg.merge_file, tokenizer_model=cfg.tokenizer_model)
    config, notes = family.config(dtype, tokenizer.eod)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    shards = _plan_shards([(k, ckpt.infos[k].nbytes) for k in keys], cfg.max_shard_bytes)
    total = sum(ckpt.infos[k].nbytes for k in keys)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    provenance = {"format": "pt", "source": os.path.abspath(cfg.checkpoint), "iteration": str(ckpt.iteration)}
    with bytes_bar(total, "exporting") as bar:
        for file_name, shard in zip(files, shards):
            tensors = {}
            for key in shard:
                for name, tensor in family.to_hf(key, ckpt.read(key)):
                    tensors[name] = tensor
                    weight_map[name] = file_name
                bar.update(ckpt.infos[key].nbytes)
            save_file(tensors, os.path.join(cfg.out_dir, file_name), metadata=provenance)
    if len(files) > 1:
        with open(os.path.join(cfg.out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return ExportResult(family.name, ckpt.iteration, dict(ckpt.reader.facts.get("layout", {})), config, files, total,
                        tokenizer.tokenizer_type, tokenizer.files, notes)
