"""The GPT-2 mapping (interop/gpt2_mapping.py) and export of a stored checkpoint, in one process:
megatron's interleaved QKV against GPT-2's, the round trip of every weight, the options each
side refuses, a format-1 checkpoint's padded vocabulary, sharded safetensors."""

import json

import pytest
import torch

from interop.conversion_error import ConversionError
from interop.gpt2_mapping import (
    LAYERNORM_EPSILON,
    GPT2ConversionError,
    GPT2Shape,
    activation_of,
    from_hf,
    hf_config,
    hf_names,
    model_args_from_hf,
    to_hf,
)

ROOT_FIXTURE = "tests/fixtures/ckpt_v1_tp2_vocab100"
MODEL_ARGS = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 32, "seq_length": 16,
              "max_position_embeddings": 16, "vocab_size": 11, "make_vocab_size_divisible_by": 128,
              "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.02,
              "untie_embeddings_and_output_weights": False}


def test_layernorm_epsilon_is_megatron_cores_default():
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    default = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}["layernorm_epsilon"]
    assert LAYERNORM_EPSILON == default


def test_qkv_heads_come_out_where_each_side_splits_them():
    """megatron's SelfAttention views linear_qkv's output as [heads, (q, k, v), head dim] (one
    query group per head); GPT-2 splits c_attn's output into q | k | v, each [heads, head dim]."""
    torch.manual_seed(0)
    heads, dim, hidden, tokens = 4, 3, 12, 5
    shape = GPT2Shape(1, hidden, heads, tied=True)
    weight, bias, x = torch.randn(3 * hidden, hidden), torch.randn(3 * hidden), torch.randn(tokens, hidden)
    mixed = (x @ weight.t() + bias).view(tokens, heads, 3 * dim)
    q, k, v = torch.split(mixed, [dim, dim, dim], dim=-1)  # as get_query_key_value_tensors does
    _, c_attn_w = to_hf("decoder.layers.0.self_attention.linear_qkv.weight", weight, shape)
    _, c_attn_b = to_hf("decoder.layers.0.self_attention.linear_qkv.bias", bias, shape)
    assert c_attn_w.shape == (hidden, 3 * hidden)  # Conv1D: (in, out)
    hq, hk, hv = (x @ c_attn_w + c_attn_b).split(hidden, dim=-1)  # as GPT2Attention does
    for ours, theirs in ((q, hq), (k, hk), (v, hv)):
        torch.testing.assert_close(ours, theirs.view(tokens, heads, dim), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_every_weight_round_trips(tied):
    shape = GPT2Shape(2, 8, 2, tied=tied)
    ours = {"embedding.word_embeddings.weight": (11, 8), "embedding.position_embeddings.weight": (16, 8),
            "decoder.final_layernorm.weight": (8,), "decoder.final_layernorm.bias": (8,)}
    for i in range(2):
        p = f"decoder.layers.{i}."
        ours.update({p + "self_attention.linear_qkv.layer_norm_weight": (8,), p + "self_attention.linear_qkv.layer_norm_bias": (8,),
                     p + "self_attention.linear_qkv.weight": (24, 8), p + "self_attention.linear_qkv.bias": (24,),
                     p + "self_attention.linear_proj.weight": (8, 8), p + "self_attention.linear_proj.bias": (8,),
                     p + "mlp.linear_fc1.layer_norm_weight": (8,), p + "mlp.linear_fc1.layer_norm_bias": (8,),
                     p + "mlp.linear_fc1.weight": (32, 8), p + "mlp.linear_fc1.bias": (32,),
                     p + "mlp.linear_fc2.weight": (8, 32), p + "mlp.linear_fc2.bias": (8,)})
    if not tied:
        ours["output_layer.weight"] = (11, 8)
    tensors = {k: torch.randn(s) for k, s in ours.items()}
    exported = dict(to_hf(k, t, shape) for k, t in tensors.items())
    assert set(exported) == hf_names(shape)
    assert exported["transformer.h.1.mlp.c_fc.weight"].shape == (8, 32)
    back = dict(from_hf(k, t, shape) for k, t in exported.items())
    assert set(back) == set(tensors)
    for k in tensors:
        assert torch.equal(back[k], tensors[k]), k


def test_a_tied_lm_head_is_not_imported_twice():
    shape = GPT2Shape(1, 8, 2, tied=True)
    assert from_hf("lm_head.weight", torch.zeros(11, 8), shape) is None
    with pytest.raises(GPT2ConversionError, match="untied output_layer.weight"):
        to_hf("output_layer.weight", torch.zeros(11, 8), shape)


def test_config_round_trips_and_names_what_it_sets():
    config = hf_config(MODEL_ARGS, "gelu", torch.float32, eod=10)
    assert config["activation_function"] == "gelu" and config["layer_norm_epsilon"] == LAYERNORM_EPSILON
    assert config["n_inner"] == 32 and config["tie_word_embeddings"] and config["eos_token_id"] == 10
    args, notes = model_args_from_hf(config)
    assert args == MODEL_ARGS and notes == []


def test_activation_follows_what_the_run_computed():
    assert activation_of({"fusions": {"bias_gelu": False}}, "cuda")[0] == "gelu"
    assert activation_of({"fusions": {"bias_gelu": True}}, "cpu")[0] == "gelu"  # refused on CPU: exact GELU ran
    activation, note = activation_of({"fusions": {"bias_gelu": True}}, "cuda")
    assert activation == "gelu_new" and "tanh" in note


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu_new"}, "--allow-activation-mismatch"),
    ({"activation_function": "relu"}, "GELU only"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"scale_attn_by_inverse_layer_idx": True}, "1/\\(layer index \\+ 1\\)"),
    ({"add_cross_attention": True}, "cross-attention"),
    ({"model_type": "llama"}, "only GPT-2"),
])
def test_import_refuses_what_our_model_cannot_express(change, message):
    config = dict(hf_config(MODEL_ARGS, "gelu", torch.float32, eod=10), **change)
    with pytest.raises(GPT2ConversionError, match=message):
        model_args_from_hf(config)


def test_tanh_gelu_imports_when_allowed_with_a_note():
    config = dict(hf_config(MODEL_ARGS, "gelu", torch.float32, eod=10), activation_function="gelu_new")
    args, notes = model_args_from_hf(config, allow_activation_mismatch=True)
    assert args == MODEL_ARGS and "tanh approximation" in notes[0]


@pytest.mark.parametrize("change", [
    {"num_query_groups": 1}, {"group_query_attention": True, "num_query_groups": 1},
    {"position_embedding_type": "rope"}, {"normalization": "RMSNorm"}, {"norm_epsilon": 1e-6},
    {"swiglu": True}, {"disable_bias_linear": True},
])
def test_export_refuses_options_gpt2_cannot_express(change):
    name = next(k for k in change if k != "group_query_attention") if len(change) > 1 else next(iter(change))
    with pytest.raises(GPT2ConversionError, match=f"{name}={change[name]!r}"):
        hf_config(dict(MODEL_ARGS, **change), "gelu", torch.float32, eod=10)


def test_export_takes_what_a_gpt2_style_run_saves():
    """A run saves every ``GPTModelConfig`` field, the Llama-style ones at GPT-2's values too."""
    from dataclasses import asdict

    from models.config import GPTModelConfig

    saved = asdict(GPTModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                                  seq_length=32, max_position_embeddings=32,
                                  vocab_size=100))
    assert hf_config(saved, "gelu", torch.float32, eod=10)["n_head"] == 4


def test_export_refuses_an_option_it_does_not_know():
    with pytest.raises(GPT2ConversionError, match="does not know: sliding_window=8"):
        hf_config(dict(MODEL_ARGS, sliding_window=8), "gelu", torch.float32, eod=10)


def _export_fixture(tmp_path, **overrides):
    from interop.hf_export import ExportConfig, export_to_hf

    return export_to_hf(ExportConfig(f"{ROOT_FIXTURE}/iter_0000003", str(tmp_path / "hf"), **overrides))


def test_format1_checkpoint_exports_its_true_vocabulary_rows(tmp_path):
    """The fixture stores the embedding padded to 256 rows (TP2); GPT-2 gets the first 100."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    result = _export_fixture(tmp_path)
    assert result.config["vocab_size"] == 100 and result.files == ["model.safetensors"]
    dcp_to_torch_save(f"{ROOT_FIXTURE}/iter_0000003", str(tmp_path / "full.pt"))
    stored = torch.load(tmp_path / "full.pt", weights_only=False)["embedding.word_embeddings.weight"]
    assert stored.shape[0] == 256
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(weights["transformer.wte.weight"], stored[:100])


def test_sharded_export_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    result = _export_fixture(tmp_path, max_shard_bytes=20_000)
    assert len(result.files) > 1
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.files)
    model, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.transformer.wte.weight.shape == (100, 32)


def test_export_writes_only_into_a_new_directory(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        _export_fixture(tmp_path)


def test_import_refuses_pickled_weights(tmp_path):
    from interop.hf_import import import_from_hf

    (tmp_path / "config.json").write_text(json.dumps(hf_config(MODEL_ARGS, "gelu", torch.float32, eod=10)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="safe_serialization=True"):
        import_from_hf(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_saved_by_transformers_round_trips(tmp_path, tied):
    """transformers' own save_pretrained -> our checkpoint -> export: the same logits, exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from interop.hf_export import ExportConfig, export_to_hf
    from interop.hf_import import import_from_hf

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=48, vocab_size=50, n_positions=16,
                        activation_function="gelu", tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    imported = import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert imported.model_args["untie_embeddings_and_output_weights"] == (not tied)
    assert ("--untie-embeddings-and-output-weights" in imported.trainer_flags("x")) == (not tied)
    export_to_hf(ExportConfig(imported.checkpoint, str(tmp_path / "back")))
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)
