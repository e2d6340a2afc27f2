"""Our GPT (megatron-core's ``GPTModel`` as ``models/gpt.py`` builds it) and ``transformers``'
GPT-2: which options agree, and how each weight maps. Pure functions of tensors and dicts.

What is the same function in both:

- pre-LayerNorm blocks (epsilon 1e-5: megatron-core's ``TransformerConfig.layernorm_epsilon``
  default, which ``models/gpt.py`` keeps; GPT-2's ``layer_norm_epsilon`` default), learned
  absolute positions, biases on every linear layer, attention scaled by 1/sqrt(head dim);
- the MLP's GELU: exact (erf) in our model, ``activation_function="gelu"`` in GPT-2; with
  ``--bias-gelu-fusion`` on CUDA megatron's fused kernel is the tanh approximation, GPT-2's
  ``gelu_new``;
- the output layer: tied to the word embeddings (``tie_word_embeddings``) or not
  (``--untie-embeddings-and-output-weights``), no bias;
- the vocabulary: our padded rows are masked out of the softmax, so only the true rows exist.

How the weights differ:

- megatron's ``linear_qkv`` output interleaves per head (per query group; our model has one
  group per head): ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (see megatron-core's
  ``SelfAttention.get_query_key_value_tensors``), GPT-2's ``c_attn`` is ``[q_0 q_1 .. | k_0 .. |
  v_0 ..]``;
- GPT-2's ``Conv1D`` stores (in, out), ``torch.nn.Linear`` (megatron's linear layers) (out, in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from interop.conversion_error import ConversionError

LAYERNORM_EPSILON = 1e-5
"""megatron-core's ``TransformerConfig.layernorm_epsilon`` default (``models/gpt.py`` does not set
it; ``tests/test_gpt2_mapping.py`` checks it against megatron-core)."""

EXACT_GELU = "gelu"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
"""GPT-2 activations that compute the tanh approximation (megatron's fused bias-GELU kernel)."""

EXPRESSIBLE_MODEL_ARGS = frozenset({
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
    "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by", "hidden_dropout",
    "attention_dropout", "init_method_std", "untie_embeddings_and_output_weights",
})
"""``GPTModelConfig`` fields GPT-2 expresses (or that do not change the function: the padding
multiple, dropout, the initialisation)."""

GPT2_ONLY_VALUES = {
    "position_embedding_type": "learned_absolute",
    "normalization": "LayerNorm",
    "norm_epsilon": LAYERNORM_EPSILON,
    "swiglu": False,
    "group_query_attention": False,
    "disable_bias_linear": False,
}
"""Options GPT-2 expresses only at one value (its own): a checkpoint that saved another (RoPE,
RMSNorm, SwiGLU, grouped-query attention, no biases: the Llama family) is refused rather than
exported wrong. ``rotary_base``, ``rotary_percent`` and ``num_query_groups`` mean nothing while
these hold GPT-2's values, so they are not checked (but a number of query groups other than
the heads' is grouped-query attention whatever the flag says). Checkpoints saved before these options
existed do not record them and read as GPT-2's."""

IGNORED_WITH_GPT2_VALUES = frozenset({"rotary_base", "rotary_percent", "num_query_groups"})


class GPT2ConversionError(ConversionError):
    """The model (or GPT-2 config) has something the other side cannot express; the message
    names it and what to do."""


@dataclass(frozen=True)
class GPT2Shape:
    """What the weight mapping needs to know about the model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    tied: bool
    """The output layer is the word embeddings (GPT-2's ``tie_word_embeddings``)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# -- configuration --------------------------------------------------------------------------------
def check_expressible(model_args: dict) -> None:
    """Raise :class:`GPT2ConversionError` if the saved model has options GPT-2 cannot express."""
    unknown = sorted(set(model_args) - EXPRESSIBLE_MODEL_ARGS - set(GPT2_ONLY_VALUES) - IGNORED_WITH_GPT2_VALUES)
    if unknown:
        raise GPT2ConversionError(
            f"the checkpoint's model has options this converter does not know: "
            f"{', '.join(f'{k}={model_args[k]!r}' for k in unknown)}; it refuses rather than export "
            "something GPT-2 may not compute")
    different = sorted(k for k, gpt2 in GPT2_ONLY_VALUES.items() if model_args.get(k, gpt2) != gpt2)
    groups = model_args.get("num_query_groups")
    if groups not in (None, model_args["num_attention_heads"]):
        different.append("num_query_groups")
    if different:
        raise GPT2ConversionError(
            f"the checkpoint's model is not GPT-2: {', '.join(f'{k}={model_args.get(k)!r}' for k in different)} "
            "(GPT-2 has learned positions, LayerNorm with epsilon 1e-5, a GELU MLP, one key/value head per "
            "query head and biases)")
    if model_args["hidden_size"] % model_args["num_attention_heads"]:
        raise GPT2ConversionError(f"hidden size {model_args['hidden_size']} is not a multiple of "
                                  f"{model_args['num_attention_heads']} heads")


def activation_of(training_args: dict, device: str | None) -> tuple[str, str | None]:
    """(GPT-2 ``activation_function``, a note for the user or None) of a saved run.

    ``--bias-gelu-fusion`` was only granted on CUDA (``models/fusions.py``), and there it is the
    tanh approximation; everywhere else the MLP computed the exact GELU."""
    asked = bool((training_args.get("fusions") or {}).get("bias_gelu", False))
    if asked and device == "cuda":
        return "gelu_new", ("the run asked for --bias-gelu-fusion on CUDA: its MLP computed the tanh approximation "
                            "of GELU (megatron's fused kernel), exported as GPT-2's gelu_new; if torch.compile did not "
                            "work there, the run's log said the fusion was refused and the exact GELU was used: pass "
                            "--activation gelu")
    return EXACT_GELU, None


def hf_config(model_args: dict, activation: str, dtype: torch.dtype, eod: int | None) -> dict:
    """``config.json`` of ``transformers``' ``GPT2LMHeadModel`` for the saved model."""
    check_expressible(model_args)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model_args["vocab_size"],
        "n_positions": model_args["max_position_embeddings"],
        "n_embd": model_args["hidden_size"],
        "n_layer": model_args["num_layers"],
        "n_head": model_args["num_attention_heads"],
        "n_inner": model_args["ffn_hidden_size"],
        "activation_function": activation,
        "resid_pdrop": model_args.get("hidden_dropout", 0.0),
        "embd_pdrop": model_args.get("hidden_dropout", 0.0),  # megatron drops the embeddings with hidden_dropout
        "attn_pdrop": model_args.get("attention_dropout", 0.0),
        "layer_norm_epsilon": LAYERNORM_EPSILON,
        "initializer_range": model_args.get("init_method_std", 0.02),
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not model_args.get("untie_embeddings_and_output_weights", False),
        "bos_token_id": eod,
        "eos_token_id": eod,
        "use_cache": True,
        # transformers 5 reads "dtype", 4 "torch_dtype"; each ignores the other's.
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def model_args_from_hf(config: dict, allow_activation_mismatch: bool = False) -> tuple[dict, list[str]]:
    """(``GPTModelConfig`` fields, notes) of a ``transformers`` GPT-2 ``config.json``; raises
    :class:`GPT2ConversionError` for what our model cannot express."""
    if config.get("model_type") != "gpt2":
        raise GPT2ConversionError(f"config.json has model_type {config.get('model_type')!r}; only GPT-2 (gpt2) and Llama (llama) map "
                                  "onto this trainer's model")
    notes: list[str] = []
    refusals = {
        "add_cross_attention": (False, "cross-attention layers"),
        "scale_attn_weights": (True, "attention without the 1/sqrt(head dim) scale"),
        "scale_attn_by_inverse_layer_idx": (False, "attention scaled by 1/(layer index + 1)"),
    }
    for name, (ours, what) in refusals.items():
        if config.get(name, ours) != ours:
            raise GPT2ConversionError(f"config.json: {name}={config[name]!r} ({what}): this trainer's model has no such option")
    eps = config.get("layer_norm_epsilon", LAYERNORM_EPSILON)
    if eps != LAYERNORM_EPSILON:
        raise GPT2ConversionError(f"config.json: layer_norm_epsilon={eps}; this trainer's LayerNorm uses "
                                  f"{LAYERNORM_EPSILON} (megatron-core's default) and has no flag for another")
    activation = config.get("activation_function", "gelu_new")
    if activation in TANH_GELUS:
        message = (f"config.json: activation_function={activation!r} is the tanh approximation of GELU; this trainer's "
                   "MLP computes the exact GELU (on CUDA, --bias-gelu-fusion computes the tanh one)")
        if not allow_activation_mismatch:
            raise GPT2ConversionError(message + ". Pass --allow-activation-mismatch to import anyway (logits then "
                                                "differ slightly from the original model's)")
        notes.append(message + "; imported anyway (--allow-activation-mismatch): train with --bias-gelu-fusion on a "
                               "GPU for the same function")
    elif activation != EXACT_GELU:
        raise GPT2ConversionError(f"config.json: activation_function={activation!r}: this trainer's MLP is GELU only")
    hidden = config["n_embd"]
    if config.get("embd_pdrop", 0.0) != config.get("resid_pdrop", 0.0):
        notes.append(f"embd_pdrop {config.get('embd_pdrop')} differs from resid_pdrop {config.get('resid_pdrop')}: "
                     "this trainer drops the embeddings with --hidden-dropout (resid_pdrop)")
    args = {
        "num_layers": config["n_layer"],
        "hidden_size": hidden,
        "num_attention_heads": config["n_head"],
        "ffn_hidden_size": config.get("n_inner") or 4 * hidden,
        "seq_length": config["n_positions"],
        "max_position_embeddings": config["n_positions"],
        "vocab_size": config["vocab_size"],
        "make_vocab_size_divisible_by": 128,
        "hidden_dropout": config.get("resid_pdrop", 0.1),
        "attention_dropout": config.get("attn_pdrop", 0.1),
        "init_method_std": config.get("initializer_range", 0.02),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", True),
    }
    check_expressible(args)
    return args, notes


def shape_of(model_args: dict) -> GPT2Shape:
    return GPT2Shape(model_args["num_layers"], model_args["hidden_size"], model_args["num_attention_heads"],
                     tied=not model_args.get("untie_embeddings_and_output_weights", False))


# -- weights --------------------------------------------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")

_GLOBAL = {
    "embedding.word_embeddings.weight": "transformer.wte.weight",
    "embedding.position_embeddings.weight": "transformer.wpe.weight",
    "decoder.final_layernorm.weight": "transformer.ln_f.weight",
    "decoder.final_layernorm.bias": "transformer.ln_f.bias",
    "output_layer.weight": "lm_head.weight",
}
# Per layer: ours -> (GPT-2's, how the tensor changes). The layer norms are stored under the
# names of TransformerEngine's fused norms by both of megatron's layer specs (the local spec maps
# input_layernorm/pre_mlp_layernorm onto them in its sharded state dict); the local names are
# accepted too.
_PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": ("ln_1.weight", "same"),
    "self_attention.linear_qkv.layer_norm_bias": ("ln_1.bias", "same"),
    "input_layernorm.weight": ("ln_1.weight", "same"),
    "input_layernorm.bias": ("ln_1.bias", "same"),
    "self_attention.linear_qkv.weight": ("attn.c_attn.weight", "qkv_weight"),
    "self_attention.linear_qkv.bias": ("attn.c_attn.bias", "qkv_bias"),
    "self_attention.linear_proj.weight": ("attn.c_proj.weight", "transpose"),
    "self_attention.linear_proj.bias": ("attn.c_proj.bias", "same"),
    "mlp.linear_fc1.layer_norm_weight": ("ln_2.weight", "same"),
    "mlp.linear_fc1.layer_norm_bias": ("ln_2.bias", "same"),
    "pre_mlp_layernorm.weight": ("ln_2.weight", "same"),
    "pre_mlp_layernorm.bias": ("ln_2.bias", "same"),
    "mlp.linear_fc1.weight": ("mlp.c_fc.weight", "transpose"),
    "mlp.linear_fc1.bias": ("mlp.c_fc.bias", "same"),
    "mlp.linear_fc2.weight": ("mlp.c_proj.weight", "transpose"),
    "mlp.linear_fc2.bias": ("mlp.c_proj.bias", "same"),
}
# GPT-2 -> ours: the TransformerEngine-style names our checkpoints hold.
_PER_LAYER_BACK = {hf: (ours, how) for ours, (hf, how) in _PER_LAYER.items()
                   if not ours.startswith(("input_layernorm", "pre_mlp_layernorm"))}
_GLOBAL_BACK = {hf: ours for ours, hf in _GLOBAL.items()}


def _qkv_to_hf(t: torch.Tensor, shape: GPT2Shape) -> torch.Tensor:
    """[head][q,k,v][head dim] rows -> [q,k,v][head][head dim] rows."""
    heads, dim = shape.num_attention_heads, shape.head_dim
    return t.reshape(heads, 3, dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _qkv_from_hf(t: torch.Tensor, shape: GPT2Shape) -> torch.Tensor:
    heads, dim = shape.num_attention_heads, shape.head_dim
    return t.reshape(3, heads, dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def hf_name(key: str, shape: GPT2Shape) -> str:
    """GPT-2's name of our tensor ``key``. Raises :class:`GPT2ConversionError` for a tensor GPT-2
    has no place for (or an output layer in a model whose run had it tied)."""
    if key in _GLOBAL:
        if key == "output_layer.weight" and shape.tied:
            raise GPT2ConversionError("the checkpoint has an untied output_layer.weight but its run did not pass "
                                      "--untie-embeddings-and-output-weights")
        return _GLOBAL[key]
    match = _LAYER.match(key)
    if match and match.group(2) in _PER_LAYER:
        return f"transformer.h.{match.group(1)}.{_PER_LAYER[match.group(2)][0]}"
    raise GPT2ConversionError(f"the checkpoint's tensor {key} has no place in GPT-2")


def to_hf(key: str, tensor: torch.Tensor, shape: GPT2Shape) -> tuple[str, torch.Tensor]:
    """(GPT-2's name, GPT-2's tensor) of our tensor ``key``, contiguous."""
    name = hf_name(key, shape)
    match = _LAYER.match(key)
    how = _PER_LAYER[match.group(2)][1] if match else "same"
    if how == "qkv_weight":
        tensor = _qkv_to_hf(tensor, shape).t()
    elif how == "qkv_bias":
        tensor = _qkv_to_hf(tensor, shape)
    elif how == "transpose":
        tensor = tensor.t()
    return name, tensor.contiguous()


HF_BUFFERS = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
"""Causal-mask buffers some GPT-2 files carry (OpenAI's original upload): not weights."""


def canonical_hf_name(name: str) -> str:
    """GPT-2 names with the ``transformer.`` prefix (files saved from ``GPT2Model`` lack it)."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def from_hf(name: str, tensor: torch.Tensor, shape: GPT2Shape) -> tuple[str, torch.Tensor] | None:
    """(our name, our tensor) of GPT-2's ``name`` (canonical, see :func:`canonical_hf_name`);
    None for a tensor ours does not hold (a tied ``lm_head.weight``)."""
    if name in _GLOBAL_BACK:
        if name == "lm_head.weight" and shape.tied:
            return None
        return _GLOBAL_BACK[name], tensor.contiguous()
    match = _HF_LAYER.match(name)
    if not match or match.group(2) not in _PER_LAYER_BACK:
        raise GPT2ConversionError(f"GPT-2 tensor {name} has no place in this trainer's model")
    ours, how = _PER_LAYER_BACK[match.group(2)]
    if how == "qkv_weight":
        tensor = _qkv_from_hf(tensor.t(), shape)
    elif how == "qkv_bias":
        tensor = _qkv_from_hf(tensor, shape)
    elif how == "transpose":
        tensor = tensor.t()
    return f"decoder.layers.{match.group(1)}.{ours}", tensor.contiguous()


def hf_names(shape: GPT2Shape) -> set[str]:
    """Every weight of ``transformers``' ``GPT2LMHeadModel`` of this shape (a tied ``lm_head``
    is the word embeddings, not a tensor of its own)."""
    per_layer = {hf for hf, _ in _PER_LAYER.values()}
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    names |= {f"transformer.h.{i}.{suffix}" for i in range(shape.num_layers) for suffix in per_layer}
    if not shape.tied:
        names.add("lm_head.weight")
    return names
