"""Our Llama-style GPT (``models/gpt.py`` with RoPE, RMSNorm, SwiGLU, grouped-query attention and
no biases) and ``transformers``' ``LlamaForCausalLM``: which options agree, and how each weight
maps. Pure functions of tensors and dicts.

What is the same function in both:

- pre-RMSNorm blocks, ``x / sqrt(mean(x^2) + eps) * weight`` (``--norm-epsilon``,
  ``rms_norm_eps``);
- rotary positions on the whole head (``--rotary-percent 1``) with ``--rotary-base`` as
  ``rope_theta``, rotating the two halves of each head (megatron-core's default
  ``rotary_interleaved=False`` is transformers' ``rotate_half``), so q and k need no permutation
  (Meta's original checkpoints rotate interleaved pairs and do);
- SwiGLU, ``silu(gate) * up``, and attention scaled by 1/sqrt(head dim) with query head ``h``
  reading key/value head ``h // (heads / groups)`` (transformers' ``repeat_kv``);
- no biases, and the output layer tied to the embeddings or not.

How the weights differ:

- megatron's ``linear_qkv`` rows are per query group, ``[q_g0 (heads/groups heads), k_g0, v_g0 |
  q_g1, k_g1, v_g1 | ...]`` (``SelfAttention.get_query_key_value_tensors``); transformers has
  ``q_proj``, ``k_proj``, ``v_proj``;
- our checkpoints store SwiGLU's ``linear_fc1`` as a ``(2, ffn, hidden)`` tensor, ``[gate, up]``
  (``models/param_layout._swiglu_spec``); transformers has ``gate_proj`` and ``up_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from interop.conversion_error import ConversionError
from interop.gpt2_mapping import EXPRESSIBLE_MODEL_ARGS

LLAMA_VALUES = {
    "position_embedding_type": ("rope", "rotary positions (--position-embedding-type rope)"),
    "normalization": ("RMSNorm", "RMSNorm (--normalization RMSNorm)"),
    "swiglu": (True, "a SwiGLU MLP (--swiglu)"),
    "disable_bias_linear": (True, "no biases (--disable-bias-linear)"),
    "rotary_percent": (1.0, "rotary positions on the whole head (--rotary-percent 1)"),
}
"""Options Llama has at one value only: ``GPTModelConfig`` field -> (Llama's value, what it is)."""

KNOWN_MODEL_ARGS = EXPRESSIBLE_MODEL_ARGS | set(LLAMA_VALUES) | {
    "rotary_base", "norm_epsilon", "group_query_attention", "num_query_groups"}


class LlamaConversionError(ConversionError):
    """The model (or the Llama config) has something the other side cannot express."""


@dataclass(frozen=True)
class LlamaShape:
    """What the weight mapping needs to know about the model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    query_groups: int
    """Key/value heads (``num_key_value_heads``); the heads' number without grouped-query attention."""
    ffn_hidden_size: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.query_groups


# -- configuration --------------------------------------------------------------------------------
def is_llama(model_args: dict) -> bool:
    """True if the saved model uses any Llama-only option (then only Llama can express it)."""
    groups = model_args.get("num_query_groups")
    return (model_args.get("position_embedding_type") == "rope" or model_args.get("normalization") == "RMSNorm"
            or bool(model_args.get("swiglu")) or bool(model_args.get("disable_bias_linear"))
            or groups not in (None, model_args["num_attention_heads"]))


def check_expressible(model_args: dict) -> None:
    """Raise :class:`LlamaConversionError` if the saved model has options Llama cannot express."""
    unknown = sorted(set(model_args) - KNOWN_MODEL_ARGS)
    if unknown:
        raise LlamaConversionError(f"the checkpoint's model has options this converter does not know: "
                                   f"{', '.join(f'{k}={model_args[k]!r}' for k in unknown)}")
    different = [(k, model_args.get(k), what) for k, (llama, what) in LLAMA_VALUES.items()
                 if model_args.get(k) != llama]
    if different:
        raise LlamaConversionError(
            "the checkpoint's model is neither GPT-2 nor Llama: Llama has "
            + "; ".join(f"{what}, the model {k}={value!r}" for k, value, what in different)
            + ". Train with the Llama options (--model-size llama-tiny shows them) to export to Llama")
    if model_args["hidden_size"] % model_args["num_attention_heads"]:
        raise LlamaConversionError(f"hidden size {model_args['hidden_size']} is not a multiple of "
                                   f"{model_args['num_attention_heads']} heads")


def shape_of(model_args: dict) -> LlamaShape:
    groups = model_args.get("num_query_groups") if model_args.get("group_query_attention") else None
    return LlamaShape(model_args["num_layers"], model_args["hidden_size"], model_args["num_attention_heads"],
                      groups or model_args["num_attention_heads"], model_args["ffn_hidden_size"],
                      tied=not model_args.get("untie_embeddings_and_output_weights", False))


def hf_config(model_args: dict, dtype: torch.dtype, eod: int | None) -> tuple[dict, list[str]]:
    """(``config.json`` of ``transformers``' ``LlamaForCausalLM`` for the saved model, notes)."""
    check_expressible(model_args)
    shape = shape_of(model_args)
    dtype_name = str(dtype).removeprefix("torch.")
    theta = model_args.get("rotary_base", 10000)
    notes = []
    if model_args.get("hidden_dropout", 0.0):
        notes.append(f"the run trained with --hidden-dropout {model_args['hidden_dropout']}; Llama has no dropout "
                     "on the residual stream (the same function at inference)")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_args["vocab_size"],
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.query_groups,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_args["max_position_embeddings"],
        "rms_norm_eps": model_args.get("norm_epsilon", 1e-5),
        # transformers 5 reads rope_parameters, 4 rope_theta; each ignores the other's.
        "rope_theta": float(theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(theta)},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": model_args.get("attention_dropout", 0.0),
        "initializer_range": model_args.get("init_method_std", 0.02),
        "tie_word_embeddings": shape.tied,
        "bos_token_id": eod,
        "eos_token_id": eod,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    return config, notes


def _rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    kind = parameters.get("rope_type", "default")
    if scaling or kind != "default":
        raise LlamaConversionError(
            f"config.json scales RoPE ({scaling or parameters}): this trainer's rotary embedding has no scaling "
            "(Llama 3.1's 'llama3' frequencies), so the model would compute other positions")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_args_from_hf(config: dict) -> tuple[dict, list[str]]:
    """(``GPTModelConfig`` fields, notes) of a ``transformers`` Llama ``config.json``; raises
    :class:`LlamaConversionError` for what our model cannot express."""
    if config.get("model_type") != "llama":
        raise LlamaConversionError(f"config.json has model_type {config.get('model_type')!r}, not llama")
    refusals = {
        "hidden_act": ("silu", "an MLP activation other than SiLU"),
        "attention_bias": (False, "biases in attention (this trainer's Llama-style model has none)"),
        "mlp_bias": (False, "biases in the MLP"),
    }
    for name, (ours, what) in refusals.items():
        if config.get(name, ours) != ours:
            raise LlamaConversionError(f"config.json: {name}={config[name]!r} ({what}): this trainer's model "
                                       "cannot express it")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", hidden // heads) != hidden // heads or hidden % heads:
        raise LlamaConversionError(f"config.json: head_dim {config.get('head_dim')} is not hidden_size {hidden} / "
                                   f"{heads} heads; this trainer's heads split the hidden size")
    groups = config.get("num_key_value_heads") or heads
    theta = _rope_theta(config)
    positions = config["max_position_embeddings"]
    args = {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_hidden_size": config["intermediate_size"],
        "seq_length": positions,
        "max_position_embeddings": positions,
        "vocab_size": config["vocab_size"],
        "make_vocab_size_divisible_by": 128,
        "hidden_dropout": 0.0,
        "attention_dropout": config.get("attention_dropout", 0.0),
        "init_method_std": config.get("initializer_range", 0.02),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
        "position_embedding_type": "rope",
        "rotary_base": int(theta) if theta == int(theta) else theta,
        "rotary_percent": 1.0,
        "normalization": "RMSNorm",
        "norm_epsilon": config.get("rms_norm_eps", 1e-6),
        "swiglu": True,
        "group_query_attention": groups != heads,
        "num_query_groups": groups if groups != heads else None,
        "disable_bias_linear": True,
    }
    notes = []
    if positions > 8192:
        notes.append(f"max_position_embeddings is {positions}: pass a shorter --seq-length to train (the printed "
                     "flags use the whole table)")
    check_expressible(args)
    return args, notes


# -- weights --------------------------------------------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# Per layer: ours -> Llama's names. Norms under TransformerEngine's fused names (what our
# checkpoints hold) or the local spec's; the first spelling is what an import writes.
_PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_IMPORTED_NAMES = ("self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
                   "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
                   "mlp.linear_fc2.weight")

HF_BUFFERS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
"""Rotary frequency buffers older Llama files carry: computed from ``rope_theta``, not weights."""


def hf_names_of(key: str, shape: LlamaShape) -> tuple[str, ...]:
    """Llama's names of our tensor ``key``; raises :class:`LlamaConversionError` for a tensor Llama
    has no place for (a bias, or an output layer in a model whose run had it tied)."""
    if key in _GLOBAL:
        if key == "output_layer.weight" and shape.tied:
            raise LlamaConversionError("the checkpoint has an untied output_layer.weight but its run did not pass "
                                       "--untie-embeddings-and-output-weights")
        return (_GLOBAL[key],)
    match = _LAYER.match(key)
    if match and match.group(2) in _PER_LAYER:
        return tuple(f"model.layers.{match.group(1)}.{name}" for name in _PER_LAYER[match.group(2)])
    raise LlamaConversionError(f"the checkpoint's tensor {key} has no place in Llama"
                               + (" (Llama has no biases)" if key.endswith("bias") else ""))


def _split_qkv(t: torch.Tensor, shape: LlamaShape) -> list[torch.Tensor]:
    """Per-group rows ``[q.., k, v]`` -> q (all heads), k, v (all groups), each (rows, hidden)."""
    per_group = t.reshape(shape.query_groups, shape.heads_per_group + 2, shape.head_dim, t.shape[-1])
    q = per_group[:, :shape.heads_per_group].reshape(-1, t.shape[-1])
    k = per_group[:, shape.heads_per_group].reshape(-1, t.shape[-1])
    v = per_group[:, shape.heads_per_group + 1].reshape(-1, t.shape[-1])
    return [q, k, v]


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    g, n, d = shape.query_groups, shape.heads_per_group, shape.head_dim
    hidden = q.shape[-1]
    groups = torch.cat([q.reshape(g, n, d, hidden), k.reshape(g, 1, d, hidden), v.reshape(g, 1, d, hidden)], dim=1)
    return groups.reshape(g * (n + 2) * d, hidden)


def to_hf(key: str, tensor: torch.Tensor, shape: LlamaShape) -> list[tuple[str, torch.Tensor]]:
    """Llama's (name, tensor) pairs of our tensor ``key``, contiguous."""
    names = hf_names_of(key, shape)
    if key.endswith("linear_qkv.weight"):
        parts = _split_qkv(tensor, shape)
    elif key.endswith("linear_fc1.weight"):
        parts = list(tensor.reshape(2, shape.ffn_hidden_size, tensor.shape[-1]).unbind(0))
    else:
        parts = [tensor]
    return [(name, part.contiguous()) for name, part in zip(names, parts)]


def hf_names(shape: LlamaShape) -> set[str]:
    """Every weight of ``transformers``' ``LlamaForCausalLM`` of this shape (a tied ``lm_head``
    is the word embeddings, not a tensor of its own)."""
    per_layer = {name for names in _PER_LAYER.values() for name in names}
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    names |= {f"model.layers.{i}.{suffix}" for i in range(shape.num_layers) for suffix in per_layer}
    if not shape.tied:
        names.add("lm_head.weight")
    return names


def _expected_shapes(shape: LlamaShape, vocab: int) -> dict[str, tuple[int, ...]]:
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (shape.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (shape.query_groups * d, h), "self_attn.v_proj.weight": (shape.query_groups * d, h),
        "self_attn.o_proj.weight": (h, shape.num_attention_heads * d),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    out.update({f"model.layers.{i}.{k}": v for i in range(shape.num_layers) for k, v in per_layer.items()})
    return out


def from_hf(names: Iterable[str], get: Callable[[str], torch.Tensor], shape: LlamaShape,
            vocab: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our tensors, notes) from Llama's tensors ``names`` (``get(name)`` reads one); raises
    :class:`LlamaConversionError` for a missing, misshapen or unknown tensor."""
    present = {n for n in names if not HF_BUFFERS.match(n)}
    unknown = sorted(present - hf_names(shape) - {"lm_head.weight"})
    if unknown:
        raise LlamaConversionError(f"Llama tensors {unknown[:4]} ({len(unknown)} in all) have no place in this "
                                   "trainer's model" + (" (it has no biases)" if any(n.endswith("bias") for n in unknown)
                                                        else ""))
    missing = sorted(hf_names(shape) - present)
    if missing:
        raise LlamaConversionError(f"the weights lack {missing[:4]} ({len(missing)} in all) for the config's "
                                   f"{shape.num_layers} layers")
    expected = _expected_shapes(shape, vocab)

    def read(name: str) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != expected[name]:
            raise LlamaConversionError(f"{name} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        return t

    notes = []
    ours = {ours_key: read(hf).contiguous() for ours_key, hf in _GLOBAL.items()
            if not (ours_key == "output_layer.weight" and shape.tied)}
    if shape.tied and "lm_head.weight" in present:
        notes.append("lm_head.weight is tied to the word embeddings (tie_word_embeddings): not stored twice")
    for i in range(shape.num_layers):
        for suffix in _IMPORTED_NAMES:
            parts = [read(f"model.layers.{i}.{name}") for name in _PER_LAYER[suffix]]
            if suffix.endswith("linear_qkv.weight"):
                tensor = _join_qkv(*parts, shape)
            elif suffix.endswith("linear_fc1.weight"):
                tensor = torch.stack(parts)
            else:
                tensor = parts[0]
            ours[f"decoder.layers.{i}.{suffix}"] = tensor.contiguous()
    return ours, notes
