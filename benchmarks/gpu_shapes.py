"""The GPU bench's model arithmetic: the shapes it runs (and the flags that ask the trainer for
them), throughput and model FLOPs utilisation (``models.config.model_flops_per_iteration``), and
the GPU memory and snapshot size it expects."""

from __future__ import annotations

from dataclasses import dataclass

from models.config import PRESETS, GPTModelConfig, model_flops_per_iteration  # pure dataclasses: no torch

MATMUL_N = 8192
"""The bf16 matmul the MFU's peak is measured with (``MATMUL_N``^3)."""


@dataclass(frozen=True)
class Shape:
    """A model shape and the flags that ask the trainer for it."""

    label: str
    flags: tuple[str, ...]
    config: GPTModelConfig

    @classmethod
    def preset(cls, name: str, vocab_size: int, seq_length: int | None = None) -> "Shape":
        """A ``--model-size`` preset; ``seq_length``: a shorter sequence than the preset's (RoPE's
        --max-position-embeddings with it)."""
        values = dict(PRESETS[name], vocab_size=vocab_size)
        flags: tuple[str, ...] = ("--model-size", name, "--vocab-size", str(vocab_size))
        label = f"{name} preset"
        if seq_length is not None:
            values.update(seq_length=seq_length, max_position_embeddings=seq_length)
            flags += ("--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length))
            label += f" at sequence {seq_length}"
        return cls(label, flags, GPTModelConfig(**values))

    @classmethod
    def explicit(cls, label: str, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> "Shape":
        # Explicit flags: the presets have no 350M, and flags say exactly what was run.
        flags = ("--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
                 "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--vocab-size", str(vocab))
        config = GPTModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                ffn_hidden_size=4 * hidden, seq_length=seq, max_position_embeddings=seq,
                                vocab_size=vocab)
        return cls(label, flags, config)

    @property
    def parameters(self) -> int:
        return self.config.num_parameters(1)

    @property
    def padded_vocab(self) -> int:
        return self.config.padded_vocab_size(1)


MFU_FORMULA = ("model FLOPs per iteration = 6 x tokens x (non-embedding parameters + output-layer parameters) "
               "+ 12 x layers x hidden x seq x tokens (PaLM's formula, appendix B; causal mask not discounted, "
               "no recomputation counted; SwiGLU's three and grouped attention's smaller matrices are in the "
               "parameters, the attention term is every query head's); MFU = those FLOPs / median iteration time "
               "/ the bf16 matmul peak "
               f"measured below ({MATMUL_N}^3 torch.matmul)")


def activation_bytes_per_token(config: GPTModelConfig, bf16: bool, recompute: str | None = None) -> float:
    """Bytes one layer keeps for the backward per token of a micro-batch (``s*b``), without
    tensor or sequence parallelism. Korthikanti et al. 2022 (table 2) term by term, so that a GPT
    layer (GELU MLP of 4h, dropout) gives their ``34h + 5as``:

    - the two norms' inputs: ``2 * 2h``;
    - attention: the QKV projection's input ``2h``, queries, keys and values ``2 * 3h`` as core
      attention keeps them (the sdpa backend widens grouped keys and values to every head) plus
      ``2 * 2 * kv`` for the grouped ones when there are fewer key/value heads (``kv``: their width;
      a margin: what RoPE or the widening may keep), the output projection's input ``2h`` and,
      with hidden dropout, its mask ``h``;
    - the MLP: its input ``2h``, the first projection's output ``2 * fc1`` (``fc1`` = f, or 2f
      gate and up with SwiGLU), the activation's output ``2f`` and with SwiGLU the product
      ``2f`` (the second projection's input), with hidden dropout a mask ``h``;
    - the attention scores as materialised (``--attention-backend local``): the softmax output
      ``2as`` and with attention dropout its mask ``as`` and output ``2as``. The default sdpa
      backend (flash attention) keeps none of them: for it this term is a margin.

    ``recompute``: ``selective`` drops the scores term; ``full`` keeps only each layer's input
    ``2h`` (the layer being recomputed is counted by the caller). fp32 doubles everything (masks
    too: conservative)."""
    h, a, s, f = config.hidden_size, config.num_attention_heads, config.seq_length, config.ffn_hidden_size
    if recompute == "full":
        return 2 * h * (1 if bf16 else 2)
    kv = config.query_groups * (h // a)
    hidden_mask = h if config.hidden_dropout > 0 else 0
    norms = 2 * 2 * h
    attention = 2 * h + 2 * 3 * h + (2 * 2 * kv if kv < h else 0) + 2 * h + hidden_mask
    fc1 = 2 * f if config.swiglu else f
    mlp = 2 * h + 2 * fc1 + 2 * f + (2 * f if config.swiglu else 0) + hidden_mask
    scores = 0 if recompute == "selective" else a * s * (5 if config.attention_dropout > 0 else 2)
    return (norms + attention + mlp + scores) * (1 if bf16 else 2)


def estimated_memory_gb(config: GPTModelConfig, micro_batch: int, bf16: bool, recompute: str | None = None) -> float:
    """A conservative peak GPU memory estimate: weights, fp32 gradients, fp32 main weights and
    Adam moments (18 B/parameter in bf16), every layer's activations
    (:func:`activation_bytes_per_token`; with full recomputation one layer's whole set on top of
    every layer's input) and the logits with their fp32 loss copies (10 B per vocabulary entry
    and token)."""
    tokens = config.seq_length * micro_batch
    per_param = 18 if bf16 else 16
    states = config.num_parameters(1) * per_param
    activations = config.num_layers * tokens * activation_bytes_per_token(config, bf16, recompute)
    if recompute == "full":
        activations += tokens * activation_bytes_per_token(config, bf16)
    logits = tokens * config.padded_vocab_size(1) * 10
    return (states + activations + logits) / 1e9


@dataclass
class Throughput:
    median_ms: float
    tokens_per_s: float
    model_tflops: float
    mfu: float | None


def throughput(config: GPTModelConfig, global_batch: int, ms: float, peak_tflops: float | None) -> Throughput:
    tokens = global_batch * config.seq_length
    tflops = model_flops_per_iteration(config, tokens) / (ms / 1000) / 1e12
    return Throughput(ms, tokens / (ms / 1000), tflops, tflops / peak_tflops if peak_tflops else None)


def state_bytes_estimate(config: GPTModelConfig, bf16: bool) -> int:
    """Bytes of one snapshot on one rank: fp32 main weights and two Adam moments, plus the bf16
    weights in bf16 (with fp32 weights the weight record points at the main weights)."""
    return config.num_parameters(1) * (14 if bf16 else 12)
