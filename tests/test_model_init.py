"""Initial values depend only on a parameter's global name, and follow Megatron's rules."""

import math

import torch

from models.config import GPTModelConfig
from models.gpt import initial_value
from models.param_layout import GlobalParamSpec, _global_name

CFG = GPTModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                     seq_length=16, max_position_embeddings=16, vocab_size=128)


def spec(name, shape):
    return GlobalParamSpec(name, shape, (0,) * len(shape), shape, (0, 0, 0))


def test_norms_are_one_and_biases_zero_in_both_layer_specs():
    for name in ("decoder.layers.0.input_layernorm.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",  # TransformerEngine
                 "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"):
        assert torch.equal(initial_value(spec(name, (64,)), CFG, 1), torch.ones(64)), name
    for name in ("decoder.layers.0.mlp.linear_fc1.bias", "decoder.final_layernorm.bias",
                 "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias"):
        assert torch.equal(initial_value(spec(name, (64,)), CFG, 1), torch.zeros(64)), name


def test_weights_are_seeded_by_name_and_output_projections_scaled():
    a = initial_value(spec("decoder.layers.3.mlp.linear_fc1.weight", (256, 64)), CFG, 1)
    assert torch.equal(a, initial_value(spec("decoder.layers.3.mlp.linear_fc1.weight", (256, 64)), CFG, 1))
    assert not torch.equal(a, initial_value(spec("decoder.layers.4.mlp.linear_fc1.weight", (256, 64)), CFG, 1))
    assert not torch.equal(a, initial_value(spec("decoder.layers.3.mlp.linear_fc1.weight", (256, 64)), CFG, 2))
    assert abs(a.std().item() - 0.02) < 0.002
    proj = initial_value(spec("decoder.layers.3.mlp.linear_fc2.weight", (64, 256)), CFG, 1)
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 8)) < 0.0005


def test_stacked_layer_offsets_fold_into_the_name():
    assert _global_name("decoder.layers.mlp.linear_fc1.weight", (3,)) == "decoder.layers.3.mlp.linear_fc1.weight"
    assert _global_name("embedding.word_embeddings.weight", ()) == "embedding.word_embeddings.weight"


def test_vocabulary_rows_do_not_depend_on_the_padding():
    """The padded vocabulary (128 x TP) depends on the layout; the true rows and the zero padding
    must not, or a TP2 model would start as another function than the TP1 one."""
    cfg = GPTModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                         seq_length=16, max_position_embeddings=16, vocab_size=100)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        tp1, tp4 = (initial_value(spec(name, (cfg.padded_vocab_size(tp), 64)), cfg, 1) for tp in (1, 4))
        assert tp1.shape == (128, 64) and tp4.shape == (512, 64)
        assert torch.equal(tp1[:100], tp4[:100]), name
        assert not tp1[100:].any() and not tp4[100:].any(), name
        assert abs(tp1[:100].std().item() - 0.02) < 0.002
    assert not torch.equal(initial_value(spec("embedding.word_embeddings.weight", (128, 64)), cfg, 1)[:100],
                           initial_value(spec("output_layer.weight", (128, 64)), cfg, 1)[:100])
