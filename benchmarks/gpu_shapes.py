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
    def preset(cls, name: str, vocab_size: int) -> "Shape":
        values = dict(PRESETS[name], vocab_size=vocab_size)
        return cls(f"{name} preset", ("--model-size", name, "--vocab-size", str(vocab_size)), GPTModelConfig(**values))

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
               "no recomputation counted); MFU = those FLOPs / median iteration time / the bf16 matmul peak "
               f"measured below ({MATMUL_N}^3 torch.matmul)")


def estimated_memory_gb(config: GPTModelConfig, micro_batch: int, bf16: bool) -> float:
    """A conservative peak GPU memory estimate without activation recomputation: weights, fp32
    gradients, fp32 main weights and Adam moments (18 B/parameter in bf16), activations per
    layer ``s*b*h*(34 + 5*a*s/h)`` bytes (Korthikanti et al. 2022, table 2: attention scores
    materialised, as the local layer spec without a fused attention does) and the logits with
    their fp32 loss copies."""
    s, b, h, a = config.seq_length, micro_batch, config.hidden_size, config.num_attention_heads
    per_param = 18 if bf16 else 16
    states = config.num_parameters(1) * per_param
    activations = config.num_layers * s * b * h * (34 + 5 * a * s / h) * (1 if bf16 else 2)
    logits = s * b * config.padded_vocab_size(1) * 10
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
