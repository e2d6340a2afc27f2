"""Megatron-LM's ``torch_dist`` checkpoint names and arguments <-> ours.

megatron-core's ``dist_checkpointing`` saves a ``GPTModel`` under the keys of its
``sharded_state_dict()``: the transformer layers stacked on a leading axis of ``num_layers``
(``decoder.layers.self_attention.linear_qkv.weight`` is ``(num_layers, qkv_rows, hidden)``),
everything else under its module path. Our checkpoints keep the same names with the global layer
folded in (``decoder.layers.3.self_attention.linear_qkv.weight``, ``models.param_layout``), and
both store QKV per query group (``[q heads of group g, k_g, v_g]`` for each g) and the norms under
TransformerEngine's names (``linear_qkv.layer_norm_weight``), whatever the layer spec. So the
mapping is: stack or unstack the layers; SwiGLU's ``linear_fc1`` is ``(2, ffn, hidden)`` here and
``(2 * ffn, hidden)`` there (``[gate; up]`` rows); Megatron stores the vocabulary tensors with its
padded rows, we store the true ones.

The model's options come from Megatron-LM's ``args`` (an ``argparse.Namespace`` in
``common.pt``), whose names are the flags' own (``--num-layers`` is ``num_layers``), checked
against the tensors; a model-only save (no ``args``) has them inferred from the tensors where they
can be, and given on the command line where not (the attention heads).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from interop.conversion_error import ConversionError

LAYERS_PREFIX = "decoder.layers."
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
"""The local layer spec's modules with an ``_extra_state`` item per layer (``torch.save([None])``):
megatron-core's strict load asks for them."""
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_TENSORS = (WORD_EMBEDDINGS, OUTPUT_LAYER)
_OUR_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_FC1 = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


class MegatronConversionError(ConversionError):
    """A Megatron-LM checkpoint this trainer's model cannot take, or a model Megatron cannot."""


# -- names and tensors ------------------------------------------------------------------------------
def is_layer_key(key: str) -> bool:
    return key.startswith(LAYERS_PREFIX)


def is_extra_state(key: str) -> bool:
    return "._extra_state" in key


def from_megatron(stacked: dict[str, torch.Tensor], model_args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Megatron's tensors -> ours: layers unstacked, SwiGLU's fc1 split in [gate, up], the
    vocabulary tensors cut to the true vocabulary's rows."""
    vocab = model_args["vocab_size"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in stacked.items():
        if not is_layer_key(key):
            out[key] = tensor[:vocab].clone() if key in VOCAB_TENSORS else tensor
            continue
        suffix = key[len(LAYERS_PREFIX):]
        if tensor.shape[0] != model_args["num_layers"]:
            raise MegatronConversionError(f"{key} stacks {tensor.shape[0]} layers, the model has "
                                          f"--num-layers {model_args['num_layers']}")
        for layer in range(tensor.shape[0]):
            part = tensor[layer]
            if model_args.get("swiglu") and suffix in _FC1:
                part = part.reshape(2, part.shape[0] // 2, *part.shape[1:])
            out[f"{LAYERS_PREFIX}{layer}.{suffix}"] = part.clone()
    return out


def to_megatron(ours: dict[str, torch.Tensor], model_args: dict[str, Any], padded_vocab: int) -> dict[str, Any]:
    """Our tensors -> Megatron's state dict: layers stacked, fc1 flattened, the vocabulary
    tensors padded with zero rows to ``padded_vocab``, and each layer module's ``_extra_state``."""
    num_layers = model_args["num_layers"]
    layers: dict[str, list[torch.Tensor | None]] = {}
    out: dict[str, Any] = {}
    for name, tensor in ours.items():
        match = _OUR_LAYER.match(name)
        if match is None:
            if name in VOCAB_TENSORS and tensor.shape[0] < padded_vocab:
                tensor = torch.cat([tensor, tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])])
            out[name] = tensor
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        if suffix in _FC1 and tensor.dim() >= 2 and tensor.shape[0] == 2 and model_args.get("swiglu"):
            tensor = tensor.reshape(-1, *tensor.shape[2:])
        layers.setdefault(suffix, [None] * num_layers)[layer] = tensor
    for suffix, per_layer in layers.items():
        missing = [i for i, t in enumerate(per_layer) if t is None]
        if missing:
            raise MegatronConversionError(f"{LAYERS_PREFIX}<layer>.{suffix} is missing for layers {missing}")
        out[LAYERS_PREFIX + suffix] = torch.stack(per_layer)  # type: ignore[arg-type]
    for module in EXTRA_STATE_MODULES:
        for layer in range(num_layers):
            out[f"{LAYERS_PREFIX}{module}._extra_state/shard_{layer}_{num_layers}"] = [None]
    return out


# -- the model's options ------------------------------------------------------------------------------
MODEL_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
              "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
              "untie_embeddings_and_output_weights", "position_embedding_type", "rotary_base", "rotary_percent",
              "normalization", "norm_epsilon", "swiglu", "group_query_attention", "num_query_groups",
              "disable_bias_linear")
"""Our model's fields (``models.config.GPTModelConfig``) that a Megatron-LM ``args`` gives: the
same names, but ``disable_bias_linear``, which is Megatron's ``add_bias_linear`` negated."""


def model_args_from_megatron(args: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]],
                             given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our model's options for a Megatron checkpoint, and notes: from its ``args`` where present,
    else inferred from the tensors' ``shapes``, with ``given`` (the converter's flags) filling in
    what neither has. Every value is checked against the tensors; a difference names the flag."""
    notes: list[str] = []
    inferred = _inferred_from_shapes(shapes)
    model: dict[str, Any] = {}
    if args:
        for name in MODEL_ARGS:
            source = "add_bias_linear" if name == "disable_bias_linear" else name
            if source in args and args[source] is not None:
                value = args[source]
                model[name] = (not value) if name == "disable_bias_linear" else value
        if model.get("num_query_groups") is not None and not model.get("group_query_attention"):
            model["num_query_groups"] = None  # Megatron ignores it then, and so do we
    else:
        notes.append("common.pt holds no Megatron-LM args (a model-only save): the model's options are read from "
                     "the tensors' shapes and the flags given")
    for name, value in given.items():
        if value is not None:
            model[name] = value
    for name, value in inferred.items():
        model.setdefault(name, value)
    if "num_attention_heads" not in model:
        raise MegatronConversionError("the attention heads cannot be read from the tensors and common.pt has no "
                                      "args: give --num-attention-heads (and --num-query-groups for grouped-query "
                                      "attention)")
    model.setdefault("seq_length", model.get("max_position_embeddings", 2048))
    model.setdefault("max_position_embeddings", model["seq_length"])
    _check_against_shapes(model, shapes)
    return model, notes


def _inferred_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the tensors themselves say about the model."""
    try:
        vocab, hidden = shapes[WORD_EMBEDDINGS]
        num_layers = shapes[LAYERS_PREFIX + "self_attention.linear_qkv.weight"][0]
        fc1_rows = shapes[LAYERS_PREFIX + "mlp.linear_fc1.weight"][1]
        fc2_columns = shapes[LAYERS_PREFIX + "mlp.linear_fc2.weight"][2]
    except (KeyError, ValueError):
        raise MegatronConversionError(
            "not a GPT model's checkpoint: it lacks embedding.word_embeddings.weight or the stacked "
            "decoder.layers.{self_attention.linear_qkv,mlp.linear_fc1,mlp.linear_fc2}.weight "
            "(only the local and TransformerEngine layer specs' names are read)") from None
    out: dict[str, Any] = {
        "num_layers": num_layers, "hidden_size": hidden, "vocab_size": vocab, "ffn_hidden_size": fc2_columns,
        "swiglu": fc1_rows == 2 * fc2_columns,
        "untie_embeddings_and_output_weights": OUTPUT_LAYER in shapes,
        "normalization": "LayerNorm" if LAYERS_PREFIX + "self_attention.linear_qkv.layer_norm_bias" in shapes
        else "RMSNorm",
        "disable_bias_linear": LAYERS_PREFIX + "self_attention.linear_proj.bias" not in shapes,
        "position_embedding_type": "learned_absolute" if POSITION_EMBEDDINGS in shapes else "rope",
    }
    if POSITION_EMBEDDINGS in shapes:
        out["max_position_embeddings"] = shapes[POSITION_EMBEDDINGS][0]
    return out


_SHAPE_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
                "swiglu": "--swiglu", "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
                "normalization": "--normalization", "disable_bias_linear": "--disable-bias-linear",
                "position_embedding_type": "--position-embedding-type",
                "max_position_embeddings": "--max-position-embeddings"}


def _check_against_shapes(model: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse options the tensors contradict, naming the flag (``--hidden-size: 64 in the args,
    128 in the tensors``); the vocabulary must fit in the stored rows."""
    inferred = _inferred_from_shapes(shapes)
    for name, flag in _SHAPE_FLAGS.items():
        if name in inferred and model.get(name) != inferred[name]:
            raise MegatronConversionError(f"{flag}: {model.get(name)!r} in the args or flags, {inferred[name]!r} in "
                                          "the tensors; the checkpoint is not of the model its args describe")
    if model["vocab_size"] > inferred["vocab_size"]:
        raise MegatronConversionError(f"--vocab-size {model['vocab_size']} is more than the "
                                      f"{inferred['vocab_size']} rows of {WORD_EMBEDDINGS}")
    heads, hidden = model["num_attention_heads"], model["hidden_size"]
    if hidden % heads:
        raise MegatronConversionError(f"--hidden-size {hidden} is not a multiple of --num-attention-heads {heads}")
    groups = model.get("num_query_groups") if model.get("group_query_attention") else heads
    qkv_rows = shapes[LAYERS_PREFIX + "self_attention.linear_qkv.weight"][1]
    want = (heads + 2 * groups) * (hidden // heads)
    if qkv_rows != want:
        raise MegatronConversionError(
            f"--num-attention-heads {heads} with {groups} key/value groups makes the QKV weight {want} rows, the "
            f"checkpoint's has {qkv_rows}: give the heads and --num-query-groups the run had (kv_channels other "
            "than hidden / heads are not supported)")


def megatron_args(model: dict[str, Any], padded_vocab: int, iteration: int, dtype: torch.dtype) -> dict[str, Any]:
    """The ``args`` a Megatron-LM run of this model would have saved (what its loader and
    ``check_checkpoint_args`` read), TP1 x PP1 as the file is laid out whole."""
    args = {name: model.get(name) for name in MODEL_ARGS if name != "disable_bias_linear"}
    args.update(add_bias_linear=not model.get("disable_bias_linear", False), padded_vocab_size=padded_vocab,
                kv_channels=model["hidden_size"] // model["num_attention_heads"],
                num_query_groups=model.get("num_query_groups") or model["num_attention_heads"],
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, iteration=iteration,
                ckpt_format="torch_dist", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                params_dtype=dtype, use_dist_ckpt=True)
    return args


def padded_vocab_size(vocab: int, divisible_by: int) -> int:
    """Megatron-LM's padded vocabulary at TP1 (``_vocab_size_with_padding``)."""
    return -(-vocab // divisible_by) * divisible_by


def unread(keys: Iterable[str]) -> list[str]:
    """The kinds of items of a Megatron checkpoint this converter does not carry over, as notes."""
    kinds: dict[str, int] = {}
    for key in keys:
        kind = key.split("/")[0].split(".")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return [f"not carried over: {kind} ({n} item{'s' if n > 1 else ''})" for kind, n in sorted(kinds.items())]
