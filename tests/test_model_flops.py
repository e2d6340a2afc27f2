"""The FLOPs model the benches measure MFU with (``models.config.model_flops_per_iteration``),
against PaLM's formula written out by hand on small shapes."""

import pytest

from models.config import GPTModelConfig, model_flops_per_iteration


def _config(untied: bool) -> GPTModelConfig:
    return GPTModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=32,
                          max_position_embeddings=48, vocab_size=1000, untie_embeddings_and_output_weights=untied)


@pytest.mark.parametrize("untied", [False, True])
def test_six_n_t_plus_attention(untied):
    config = _config(untied)
    h, f, layers, seq, vocab = 64, 256, 2, 32, 1024  # 1000 padded to a multiple of 128
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)  # 2 norms, QKV, proj, MLP
    non_embedding = layers * per_layer + 2 * h  # and the final norm
    tokens = 8 * seq
    expected = 6 * tokens * (non_embedding + vocab * h) + 12 * layers * h * seq * tokens
    assert model_flops_per_iteration(config, tokens) == expected
    # The output layer counts once whether or not its weight is tied to the word embeddings.
    assert config.num_parameters() == non_embedding + vocab * h + 48 * h + (vocab * h if untied else 0)


def test_flops_scale_with_tokens():
    config = _config(False)
    assert model_flops_per_iteration(config, 512) == 2 * model_flops_per_iteration(config, 256)
