"""The Llama weight and config mapping (interop/llama_mapping.py) as pure functions: per-group QKV
and SwiGLU's [gate, up] against transformers' separate projections, and what it refuses."""

import dataclasses

import pytest
import torch

from cli.flags import command_line, flag_values
from interop.gpt2_mapping import GPT2ConversionError
from interop.gpt2_mapping import hf_config as gpt2_hf_config
from interop.llama_mapping import (
    LlamaConversionError,
    LlamaShape,
    check_expressible,
    from_hf,
    hf_config,
    hf_names,
    is_llama,
    model_args_from_hf,
    shape_of,
    to_hf,
)
from models.config import GPTModelConfig, preset_config

LLAMA = dataclasses.asdict(preset_config("llama-tiny"))  # 4 heads in 2 query groups, ffn 176, untied
SHAPE = shape_of(LLAMA)


def test_the_preset_is_llama_and_gpt2_options_are_not():
    assert is_llama(LLAMA) and SHAPE == LlamaShape(4, 64, 4, 2, 176, tied=False)
    assert not is_llama(dataclasses.asdict(preset_config("tiny")))


def test_qkv_rows_are_split_by_query_group():
    """Row r of query head i of group g sits at row (g * (2 + 2) + i) * 16 + r of megatron's tensor,
    its key at (g * 4 + 2) * 16 + r, its value at (g * 4 + 3) * 16 + r."""
    d, per_group = SHAPE.head_dim, SHAPE.heads_per_group + 2
    rows = torch.arange(SHAPE.query_groups * per_group * d, dtype=torch.float32)[:, None].expand(-1, 64)
    (_, q), (_, k), (_, v) = to_hf("decoder.layers.0.self_attention.linear_qkv.weight", rows, SHAPE)
    assert q.shape == (4 * d, 64) and k.shape == v.shape == (2 * d, 64)
    head_3 = q[3 * d:4 * d, 0]  # group 1, its second query head
    assert head_3.tolist() == list(range(1 * per_group * d + d, 1 * per_group * d + 2 * d))
    assert k[d:, 0].tolist() == list(range(1 * per_group * d + 2 * d, 1 * per_group * d + 3 * d))
    assert v[:d, 0].tolist() == list(range(3 * d, 4 * d))  # group 0: after its 2 query heads and its key


def _our_weights(shape: LlamaShape, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv_rows = (shape.num_attention_heads + 2 * shape.query_groups) * shape.head_dim
    ours = {"embedding.word_embeddings.weight": torch.randn(vocab, h, generator=g),
            "decoder.final_layernorm.weight": torch.randn(h, generator=g)}
    if not shape.tied:
        ours["output_layer.weight"] = torch.randn(vocab, h, generator=g)
    for i in range(shape.num_layers):
        p = f"decoder.layers.{i}."
        ours |= {p + "self_attention.linear_qkv.layer_norm_weight": torch.randn(h, generator=g),
                 p + "self_attention.linear_qkv.weight": torch.randn(qkv_rows, h, generator=g),
                 p + "self_attention.linear_proj.weight": torch.randn(h, h, generator=g),
                 p + "mlp.linear_fc1.layer_norm_weight": torch.randn(h, generator=g),
                 p + "mlp.linear_fc1.weight": torch.randn(2, f, h, generator=g),
                 p + "mlp.linear_fc2.weight": torch.randn(h, f, generator=g)}
    return ours


@pytest.mark.parametrize("tied", [False, True])
def test_export_then_import_is_bitwise_the_same(tied):
    shape = dataclasses.replace(SHAPE, tied=tied)
    ours = _our_weights(shape)
    hf = dict(pair for key, t in ours.items() for pair in to_hf(key, t, shape))
    assert set(hf) == hf_names(shape)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(gate, ours["decoder.layers.1.mlp.linear_fc1.weight"][0])
    assert torch.equal(up, ours["decoder.layers.1.mlp.linear_fc1.weight"][1])
    back, _ = from_hf(hf, hf.__getitem__, shape, vocab=50)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_import_refuses_biases_and_wrong_shapes():
    ours = _our_weights(SHAPE)
    hf = dict(pair for key, t in ours.items() for pair in to_hf(key, t, SHAPE))
    with pytest.raises(LlamaConversionError, match="has no biases"):
        from_hf({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, hf.__getitem__, SHAPE, vocab=50)
    wrong = dict(hf, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(LlamaConversionError, match=r"k_proj.weight has shape \(64, 64\), config.json implies \(32, 64\)"):
        from_hf(wrong, wrong.__getitem__, SHAPE, vocab=50)
    lacking = {k: v for k, v in hf.items() if "layers.3." not in k}
    with pytest.raises(LlamaConversionError, match="the weights lack"):
        from_hf(lacking, lacking.__getitem__, SHAPE, vocab=50)


def test_config_round_trip_and_the_flags_it_prints():
    config, notes = hf_config(LLAMA, torch.float32, eod=3)
    assert (config["num_key_value_heads"], config["rope_theta"], config["rms_norm_eps"]) == (2, 10000.0, 1e-5)
    assert not config["tie_word_embeddings"] and not notes
    args, _ = model_args_from_hf(config)
    assert args == LLAMA
    # The import's printed flags parse back to the same model (cli/flags.py, both directions).
    from trainer.arguments import build_parser

    flags = command_line(GPTModelConfig, args, always=("num_layers",))
    parsed = flag_values(build_parser().parse_args(flags + ["--mock-data", "--lr", "1e-3", "--train-iters", "1"]), GPTModelConfig)
    assert GPTModelConfig(**parsed) == GPTModelConfig(**LLAMA)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "scales RoPE"),
    ({"attention_bias": True}, "biases in attention"),
    ({"hidden_act": "gelu"}, "SiLU"),
    ({"head_dim": 32}, "head_dim 32"),
])
def test_import_refuses_what_our_model_cannot_express(change, message):
    config = dict(hf_config(LLAMA, torch.float32, eod=3)[0], **change)
    with pytest.raises(LlamaConversionError, match=message):
        model_args_from_hf(config)


@pytest.mark.parametrize("change, message", [
    ({"disable_bias_linear": False}, "no biases"),
    ({"normalization": "LayerNorm"}, "RMSNorm"),
    ({"swiglu": False}, "SwiGLU"),
    ({"rotary_percent": 0.5}, "whole head"),
])
def test_export_refuses_a_model_that_is_neither(change, message):
    with pytest.raises(LlamaConversionError, match=message):
        check_expressible(dict(LLAMA, **change))
    if change != {"rotary_percent": 0.5}:  # with the others, GPT-2 refuses too, naming an option
        with pytest.raises(GPT2ConversionError, match="not GPT-2"):
            gpt2_hf_config(dict(LLAMA, **change), "gelu", torch.float32, eod=3)
