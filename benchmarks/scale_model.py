"""A rank's parameters as megatron-core lays them out, without building the model.

The scale simulator (``benchmarks.scale``) needs, for every (TP, PP) rank of a 405B model, what
``models.param_layout.global_param_specs`` would say of each local parameter, in
``named_parameters()`` order (that order decides the flat buffers, hence the optimizer's shards).
No machine here can build those models, so this module writes the table down from megatron-core's
local layer spec: column-parallel weights split dim 0, row-parallel ones dim 1, norms and
row-parallel biases replicated over TP, the vocabulary padded per TP degree, SwiGLU's ``fc1`` as
``(2, ffn, h)``. ``tests/test_scale_model.py`` checks it against the real model's specs (TP1), and
``tests/test_state_layout.py`` the pieces it leads to against the trainer's at TP2xPP2xDP2.
"""

from __future__ import annotations

import dataclasses
import math

from models.config import PRESETS, GPTModelConfig, preset_config
from models.param_layout import GlobalParamSpec
from trainer.flat_buffers import ParamFacts

EXTRA_SHAPES: dict[str, dict] = {
    # Meta's published Llama 3.1 70B and 405B config.json (128,256-token vocabulary, 8 KV heads,
    # untied embeddings); the context length does not change the parameter layout.
    "llama3-70B": dict(PRESETS["llama3-8B"], num_layers=80, hidden_size=8192, num_attention_heads=64,
                       num_query_groups=8, ffn_hidden_size=28672),
    "llama3-405B": dict(PRESETS["llama3-8B"], num_layers=126, hidden_size=16384, num_attention_heads=128,
                        num_query_groups=8, ffn_hidden_size=53248),
}


def model_config(name: str) -> GPTModelConfig:
    """A ``models.config`` preset, or one of :data:`EXTRA_SHAPES`."""
    if name in EXTRA_SHAPES:
        return GPTModelConfig(**EXTRA_SHAPES[name])
    return preset_config(name)


@dataclasses.dataclass(frozen=True)
class SimulatedParam:
    """One local parameter of a simulated rank."""

    facts: ParamFacts
    """What the flat layout needs (``trainer.flat_buffers.layout_spans``)."""
    spec: GlobalParamSpec
    """What ``global_param_specs`` would say of it."""


def _split(global_shape: tuple[int, ...], dim: int | None, tp: int, tp_rank: int, lead: tuple[int, ...] = ()):
    """(global_offset, local_shape, tp replica) of TP rank ``tp_rank``'s part, split along ``dim``
    (None: replicated, TP rank r is replica r)."""
    if dim is None:
        return (0,) * len(global_shape), global_shape, tp_rank
    if global_shape[dim] % tp:
        raise ValueError(f"dimension {dim} of {global_shape} does not split over TP{tp}")
    part = global_shape[dim] // tp
    offset = tuple(tp_rank * part if d == dim else 0 for d in range(len(global_shape)))
    local = tuple(part if d == dim else s for d, s in enumerate(global_shape))
    return offset, local, 0


def stage_params(cfg: GPTModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int) -> list[SimulatedParam]:
    """The parameters of TP rank ``tp_rank`` of pipeline stage ``pp_rank``, in megatron-core's
    ``named_parameters()`` order (local spec: embedding, layers, final norm, output layer)."""
    if cfg.num_layers % pp:
        raise ValueError(f"{cfg.num_layers} layers do not split evenly over PP{pp} (the trainer needs it)")
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_width = cfg.query_groups * (h // heads)
    vocab = cfg.padded_vocab_size(tp)
    bias = not cfg.disable_bias_linear
    norm_bias = cfg.normalization == "LayerNorm"
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not cfg.untie_embeddings_and_output_weights
    out: list[SimulatedParam] = []

    def add(local: str, global_name: str, global_shape: tuple[int, ...], dim: int | None,
            tied_copy: bool = False, shared_embedding: bool = False) -> None:
        offset, local_shape, tp_replica = _split(global_shape, dim, tp, tp_rank)
        layout_shape, own_dim = local_shape, len(local_shape)
        if global_name.endswith("mlp.linear_fc1.weight") and cfg.swiglu:
            # SwiGLU: the local parameter is [gate rows; up rows], laid out as (2, rows, h)
            global_shape = (2, global_shape[0] // 2, *global_shape[1:])
            rows = local_shape[0] // 2
            offset, layout_shape = (0, tp_rank * rows, 0), (2, rows, *local_shape[1:])
            own_dim = 2
        spec = GlobalParamSpec(global_name=global_name, global_shape=tuple(global_shape), global_offset=offset,
                               local_shape=tuple(layout_shape), replica_id=(1 if tied_copy else 0, tp_replica, 0))
        facts = ParamFacts(name=local, numel=math.prod(layout_shape), shape=tuple(layout_shape), dim=own_dim,
                           tp_duplicate=dim is None and tp_rank != 0, tied_copy=tied_copy,
                           shared_embedding=shared_embedding, sequence_parallel=False)
        out.append(SimulatedParam(facts, spec))

    if first:
        add("embedding.word_embeddings.weight", "embedding.word_embeddings.weight", (vocab, h), 0,
            shared_embedding=tied and pp > 1)
        if cfg.learned_positions:
            add("embedding.position_embeddings.weight", "embedding.position_embeddings.weight",
                (cfg.max_position_embeddings, h), None)
    per_stage = cfg.num_layers // pp
    for i in range(per_stage):
        local, glob = f"decoder.layers.{i}.", f"decoder.layers.{pp_rank * per_stage + i}."
        add(local + "input_layernorm.weight", glob + "self_attention.linear_qkv.layer_norm_weight", (h,), None)
        if norm_bias:
            add(local + "input_layernorm.bias", glob + "self_attention.linear_qkv.layer_norm_bias", (h,), None)
        add(local + "self_attention.linear_proj.weight", glob + "self_attention.linear_proj.weight", (h, h), 1)
        if bias:
            add(local + "self_attention.linear_proj.bias", glob + "self_attention.linear_proj.bias", (h,), None)
        add(local + "self_attention.linear_qkv.weight", glob + "self_attention.linear_qkv.weight",
            (h + 2 * kv_width, h), 0)
        if bias:
            add(local + "self_attention.linear_qkv.bias", glob + "self_attention.linear_qkv.bias", (h + 2 * kv_width,), 0)
        add(local + "pre_mlp_layernorm.weight", glob + "mlp.linear_fc1.layer_norm_weight", (h,), None)
        if norm_bias:
            add(local + "pre_mlp_layernorm.bias", glob + "mlp.linear_fc1.layer_norm_bias", (h,), None)
        fc1_rows = cfg.ffn_hidden_size * (2 if cfg.swiglu else 1)
        add(local + "mlp.linear_fc1.weight", glob + "mlp.linear_fc1.weight", (fc1_rows, h), 0)
        if bias:
            add(local + "mlp.linear_fc1.bias", glob + "mlp.linear_fc1.bias", (fc1_rows,), 0)
        add(local + "mlp.linear_fc2.weight", glob + "mlp.linear_fc2.weight", (h, cfg.ffn_hidden_size), 1)
        if bias:
            add(local + "mlp.linear_fc2.bias", glob + "mlp.linear_fc2.bias", (h,), None)
    if last:
        add("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", (h,), None)
        if norm_bias:
            add("decoder.final_layernorm.bias", "decoder.final_layernorm.bias", (h,), None)
        if not tied:
            add("output_layer.weight", "output_layer.weight", (vocab, h), 0)
        elif pp > 1:  # the last stage's copy of the tied embeddings: read, never written
            add("output_layer.weight", "embedding.word_embeddings.weight", (vocab, h), 0, tied_copy=True,
                shared_embedding=True)
    return out
