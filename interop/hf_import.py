"""Import a ``transformers`` GPT-2 or Llama directory (config.json + safetensors) as one of our
checkpoints: iteration 0, weights only, which ``--load DIR --finetune`` (or ``--no-load-optim``)
reads into any layout. The tokenizer files, when present, are copied beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from cli.flags import command_line
from interop import llama_mapping
from interop.conversion_error import ConversionError
from interop.gpt2_mapping import (
    HF_BUFFERS,
    canonical_hf_name,
    from_hf,
    hf_names,
    model_args_from_hf,
    shape_of,
)
from interop.hf_export import INDEX_FILE, SINGLE_FILE
from interop.hf_tokenizer_files import import_tokenizer, tokenizer_flags
from interop.weights_checkpoint import weights_only_common, weights_only_layout, write_weights_checkpoint
from models.config import GPTModelConfig
from trainer.progress import progress_bar


@dataclass(frozen=True)
class ImportResult:
    architecture: str
    """``GPT2LMHeadModel`` or ``LlamaForCausalLM``: what ``config.json`` described."""
    checkpoint: str
    """The ``iter_0000000`` directory written."""
    model_args: dict
    tokenizer_args: dict
    """The tokenizer fields to train with (``hf_tokenizer_files.import_tokenizer``; empty without tokenizer files)."""
    dtype: torch.dtype
    weight_bytes: int
    notes: list[str] = field(default_factory=list)

    def trainer_flags(self, load_dir: str) -> list[str]:
        """The ``pretrain_gpt.py`` flags that build this model and load it."""
        # Every model option away from its default (the flags' own declaration, cli/flags.py), and
        # the shape always; the vocabulary comes from the tokenizer files when there are some.
        shape = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
                 "seq_length")
        model = {k: v for k, v in self.model_args.items() if k != "vocab_size"}
        flags = command_line(GPTModelConfig, model, always=shape)
        if self.tokenizer_args:  # the files beside the checkpoint, named as the user named it
            flags += tokenizer_flags(self.tokenizer_args, load_dir)
        else:
            flags += ["--vocab-size", self.model_args["vocab_size"]]
        return [str(f) for f in flags + ["--load", load_dir, "--finetune"]]


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(hf_dir, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    other = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))]
    raise ConversionError(
        f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE}" + (f" (only {other})" if other else "")
        + ": save the model with transformers' save_pretrained(dir, safe_serialization=True); "
          "pickled weight files are not read (they can run code)")


def _read_weights(files: list[str], shape, notes: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    ours: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    handles = [safe_open(path, framework="pt") for path in files]
    total = sum(len(list(h.keys())) for h in handles)
    with progress_bar(total=total, desc="importing", unit="tensor") as bar:
        for handle in handles:
            for name in handle.keys():
                bar.update(1)
                if HF_BUFFERS.match(name):
                    continue
                name_ = canonical_hf_name(name)
                seen.add(name_)
                mapped = from_hf(name_, handle.get_tensor(name), shape)
                if mapped is None:
                    notes.append("lm_head.weight is tied to the word embeddings (tie_word_embeddings): not stored twice")
                    continue
                ours[mapped[0]] = mapped[1]
    missing = sorted(hf_names(shape) - seen)
    if missing:
        raise ConversionError(f"the weights lack {missing[:4]} ({len(missing)} in all) for the config's "
                                  f"{shape.num_layers} layers")
    return ours


def _check_shapes(weights: dict[str, torch.Tensor], args: dict) -> None:
    expected = {
        "embedding.word_embeddings.weight": (args["vocab_size"], args["hidden_size"]),
        "embedding.position_embeddings.weight": (args["max_position_embeddings"], args["hidden_size"]),
        "decoder.layers.0.mlp.linear_fc1.weight": (args["ffn_hidden_size"], args["hidden_size"]),
        "decoder.layers.0.self_attention.linear_qkv.weight": (3 * args["hidden_size"], args["hidden_size"]),
    }
    for name, want in expected.items():
        if tuple(weights[name].shape) != want:
            raise ConversionError(f"{name} has shape {tuple(weights[name].shape)}, config.json implies {want}")


def _read_llama(hf_dir: str, model_args: dict, notes: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    handles = {}
    for path in _weight_files(hf_dir):
        handle = safe_open(path, framework="pt")
        handles.update({name: handle for name in handle.keys()})
    with progress_bar(total=len(handles), desc="importing", unit="tensor") as bar:
        def get(name: str) -> torch.Tensor:
            bar.update(1)
            return handles[name].get_tensor(name)

        weights, more = llama_mapping.from_hf(handles, get, llama_mapping.shape_of(model_args),
                                              model_args["vocab_size"])
    notes.extend(more)
    return weights


def import_from_hf(hf_dir: str, out_dir: str, allow_activation_mismatch: bool = False) -> ImportResult:
    """Write ``out_dir/iter_0000000`` from the GPT-2 or Llama model in ``hf_dir``; raises
    :class:`~interop.conversion_error.ConversionError` for what this trainer's model cannot
    express."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{hf_dir} has no config.json: not a transformers model directory")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") == "llama":
        architecture = "LlamaForCausalLM"
        model_args, notes = llama_mapping.model_args_from_hf(config)
        weights = _read_llama(hf_dir, model_args, notes)
    else:
        architecture = "GPT2LMHeadModel"
        model_args, notes = model_args_from_hf(config, allow_activation_mismatch)
        weights = _read_weights(_weight_files(hf_dir), shape_of(model_args), notes)
        _check_shapes(weights, model_args)
    dtypes = {t.dtype for t in weights.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"{out_dir} is not empty: import into a new checkpoint directory")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_args = import_tokenizer(hf_dir, out_dir, model_args["vocab_size"], notes)
    layout = weights_only_layout(model_args["num_layers"], dtype)
    common = weights_only_common(model_args, layout, dict(tokenizer_args), os.path.abspath(hf_dir))
    result = write_weights_checkpoint(out_dir, weights, common, layout)
    return ImportResult(architecture, result.path, model_args, tokenizer_args, dtype,
                        sum(t.numel() * t.element_size() for t in weights.values()), notes)
