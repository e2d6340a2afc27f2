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


def test_llama3_1b_swiglu_gqa_no_biases_by_hand():
    """llama3-1B at sequence 4096: SwiGLU's three matrices, grouped-query attention's narrower
    key/value projections, RMSNorm's scale only, no biases, no position table, tied embeddings
    (the output layer's product still counted once)."""
    from models.config import preset_config

    config = preset_config("llama3-1B", seq_length=4096, max_position_embeddings=4096)
    h, layers, seq, vocab = 2048, 16, 4096, 128256  # 128256 = 1002 x 128: no padding
    kv = 8 * (2048 // 32)  # 8 key/value heads of 64 channels: 512
    f = 8192
    per_layer = (2 * h  # two RMSNorm scales
                 + h * h + 2 * h * kv + h * h  # Q, K and V (grouped), output projection
                 + h * 2 * f + f * h)  # gate and up (fused linear_fc1), down
    assert per_layer == 60_821_504
    non_embedding = layers * per_layer + h  # and the final RMSNorm
    assert config.num_parameters() == non_embedding + vocab * h == 1_235_814_400  # tied: one vocab x h matrix
    tokens = 8 * seq
    # Attention's scores and weighted sum are over every query head (a x head dim = h), however
    # few key/value heads there are.
    expected = 6 * tokens * (non_embedding + vocab * h) + 12 * layers * h * seq * tokens
    assert model_flops_per_iteration(config, tokens) == expected
    assert expected == pytest.approx(2.9575e14, rel=1e-4)  # ~296 TFLOP per 32k-token iteration
    # Without grouping only the K and V projections grow, to h x h each.
    full = preset_config("llama3-1B", seq_length=4096, max_position_embeddings=4096, group_query_attention=False,
                         num_query_groups=None)
    assert model_flops_per_iteration(full, tokens) - expected == 6 * tokens * layers * 2 * h * (h - kv)
