"""Typed configuration of the GPT model and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cli.flags import flag, flag_name


@dataclass(frozen=True)
class GPTModelConfig:
    """Shape of a GPT model, independent of how it is parallelised."""

    num_layers: int = flag("--num-layers", derived="--model-size")
    """Number of transformer layers."""
    hidden_size: int = flag("--hidden-size", derived="--model-size")
    """Width of the residual stream."""
    num_attention_heads: int = flag("--num-attention-heads", derived="--model-size")
    """Attention heads per layer."""
    ffn_hidden_size: int = flag("--ffn-hidden-size", derived="--model-size, else 4 x --hidden-size")
    """Width of the MLP."""
    seq_length: int = flag("--seq-length", derived="--model-size")
    """Tokens per sample."""
    max_position_embeddings: int = flag("--max-position-embeddings",
                                        derived="--seq-length, or --model-size's table if longer")
    """Size of the learned position table, at least ``--seq-length``."""
    vocab_size: int = flag("--vocab-size", derived="the tokenizer's")
    """Vocabulary size before padding: of ``--mock-data`` and NullTokenizer (the other tokenizers
    bring their own)."""
    make_vocab_size_divisible_by: int = flag("--make-vocab-size-divisible-by", 128)
    """Pad the vocabulary to a multiple of this times the TP degree (Megatron's rule)."""
    hidden_dropout: float = flag("--hidden-dropout", 0.1)
    """Dropout after attention and MLP."""
    attention_dropout: float = flag("--attention-dropout", 0.1)
    """Dropout on attention probabilities."""
    init_method_std: float = flag("--init-method-std", 0.02)
    """Standard deviation of the normal initialisation of weights."""
    untie_embeddings_and_output_weights: bool = flag("--untie-embeddings-and-output-weights", False)
    """Keep a separate output projection instead of reusing the word embeddings."""

    def __post_init__(self) -> None:
        positive = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "seq_length": self.seq_length,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag_name(self, name)} must be positive, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by "
                f"--num-attention-heads {self.num_attention_heads}"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                f"{self.max_position_embeddings}: positions past the table have no embedding"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag_name(self, name)} must be in [0, 1), got {value}")

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Vocabulary padded as Megatron-LM pads it, so each TP rank gets an equal slice."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self, tensor_parallel_size: int = 1) -> int:
        """Parameters of the whole (unsharded) model."""
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        vocab = self.padded_vocab_size(tensor_parallel_size)
        embeddings = vocab * h + self.max_position_embeddings * h
        output = vocab * h if self.untie_embeddings_and_output_weights else 0
        return layers * per_layer + 2 * h + embeddings + output


def _preset(layers, hidden, heads, seq=2048, vocab=50257) -> dict:
    return dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        seq_length=seq,
        max_position_embeddings=seq,
        vocab_size=vocab,
    )


PRESETS: dict[str, dict] = {
    # Small enough for 8 gloo processes on 2 CPU cores.
    "tiny": _preset(4, 64, 4, seq=64, vocab=1024),
    # GPT-3 paper sizes (Brown et al. 2020, table 2.1).
    "125M": _preset(12, 768, 12),
    "1.3B": _preset(24, 2048, 16),
    "7B": _preset(32, 4096, 32),
}


def preset_config(name: str, **overrides) -> GPTModelConfig:
    """A preset by name, with fields overridden (e.g. a shorter ``seq_length``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GPTModelConfig)}
    if unknown:
        raise ValueError(f"unknown GPTModelConfig fields {sorted(unknown)}")
    values.update(overrides)
    return GPTModelConfig(**values)


def model_flops_per_iteration(config: GPTModelConfig, tokens: int) -> float:
    """Model FLOPs of one training iteration over ``tokens`` tokens (forward + backward, no
    recomputation counted): ``6 * tokens * (non-embedding parameters + output-layer parameters)``
    for the matrix products, plus ``12 * layers * hidden * seq * tokens`` for attention's scores
    and weighted sum (PaLM, Chowdhery et al. 2022, appendix B; the causal mask is not discounted).
    The output layer is counted although its weight may be tied to the word embeddings: its
    product is done either way."""
    h, vocab = config.hidden_size, config.padded_vocab_size(1)
    embeddings = vocab * h + config.max_position_embeddings * h
    output = vocab * h if config.untie_embeddings_and_output_weights else 0
    non_embedding = config.num_parameters(1) - embeddings - output
    dense = 6.0 * tokens * (non_embedding + vocab * h)
    attention = 12.0 * config.num_layers * h * config.seq_length * tokens
    return dense + attention
