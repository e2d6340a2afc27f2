"""Typed configuration of the GPT model and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cli.flags import flag, flag_name

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
PRESET = "--model-size's"


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
    hidden_dropout: float = flag("--hidden-dropout", 0.1, derived=PRESET)
    """Dropout after attention and MLP."""
    attention_dropout: float = flag("--attention-dropout", 0.1, derived=PRESET)
    """Dropout on attention probabilities."""
    init_method_std: float = flag("--init-method-std", 0.02, derived=PRESET)
    """Standard deviation of the normal initialisation of weights."""
    untie_embeddings_and_output_weights: bool = flag("--untie-embeddings-and-output-weights", False, derived=PRESET)
    """Keep a separate output projection instead of reusing the word embeddings."""
    position_embedding_type: str = flag("--position-embedding-type", "learned_absolute",
                                        choices=POSITION_EMBEDDING_TYPES, derived=PRESET)
    """How positions enter the model: ``learned_absolute`` (a learned table added to the word
    embeddings, GPT-2) or ``rope`` (rotary embeddings of queries and keys, Llama)."""
    rotary_base: int = flag("--rotary-base", 10000, derived=PRESET)
    """RoPE's base (theta): the longest wavelength of the rotary frequencies."""
    rotary_percent: float = flag("--rotary-percent", 1.0, derived=PRESET)
    """Share of each head's channels that RoPE rotates."""
    normalization: str = flag("--normalization", "LayerNorm", choices=NORMALIZATIONS, derived=PRESET)
    """``LayerNorm`` (with bias) or ``RMSNorm`` (scale only, Llama)."""
    norm_epsilon: float = flag("--norm-epsilon", 1e-5, derived=PRESET)
    """Epsilon of every LayerNorm or RMSNorm."""
    swiglu: bool = flag("--swiglu", False, derived=PRESET)
    """SwiGLU MLP (Llama): ``silu(x W_gate) * (x W_up)``, the gate and up projections fused in one
    ``linear_fc1``; else a GELU MLP."""
    group_query_attention: bool = flag("--group-query-attention", False, derived=PRESET)
    """Grouped-query attention: ``--num-query-groups`` key/value heads, each shared by a group of
    query heads."""
    num_query_groups: int | None = flag("--num-query-groups", None, derived=PRESET)
    """Key/value heads with ``--group-query-attention`` (it divides ``--num-attention-heads``)."""
    disable_bias_linear: bool = flag("--disable-bias-linear", False, derived=PRESET)
    """No biases in the linear layers (Llama)."""

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
            "rotary_base": self.rotary_base,
            "norm_epsilon": self.norm_epsilon,
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
            what = ("positions past the table have no embedding" if self.position_embedding_type == "learned_absolute"
                    else "RoPE is set up for --max-position-embeddings positions")
            raise ValueError(
                f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                f"{self.max_position_embeddings}: {what}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag_name(self, name)} must be in [0, 1), got {value}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"--position-embedding-type must be one of {POSITION_EMBEDDING_TYPES}, "
                             f"got {self.position_embedding_type!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.group_query_attention != (self.num_query_groups is not None):
            raise ValueError("--group-query-attention and --num-query-groups N go together (N key/value heads)")
        if self.num_query_groups is not None and (
                self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups):
            raise ValueError(f"--num-query-groups {self.num_query_groups} must divide --num-attention-heads "
                             f"{self.num_attention_heads}")

    @property
    def query_groups(self) -> int:
        """Key/value heads: ``--num-query-groups`` with grouped-query attention, else one per head."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def learned_positions(self) -> bool:
        return self.position_embedding_type == "learned_absolute"

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Vocabulary padded as Megatron-LM pads it, so each TP rank gets an equal slice."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def embedding_parameters(self, tensor_parallel_size: int = 1) -> int:
        """Word embeddings, the position table if learned, and an untied output layer."""
        h, vocab = self.hidden_size, self.padded_vocab_size(tensor_parallel_size)
        positions = self.max_position_embeddings * h if self.learned_positions else 0
        output = vocab * h if self.untie_embeddings_and_output_weights else 0
        return vocab * h + positions + output

    def num_parameters(self, tensor_parallel_size: int = 1) -> int:
        """Parameters of the whole (unsharded) model."""
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        bias = 0 if self.disable_bias_linear else 1
        norm = h if self.normalization == "RMSNorm" else 2 * h
        kv_width = self.query_groups * (h // self.num_attention_heads)
        attention = h * (h + 2 * kv_width) + bias * (h + 2 * kv_width) + h * h + bias * h
        fc1 = 2 * f if self.swiglu else f
        mlp = h * fc1 + bias * fc1 + f * h + bias * h
        return layers * (2 * norm + attention + mlp) + norm + self.embedding_parameters(tensor_parallel_size)


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


def _llama_preset(layers, hidden, heads, groups, ffn, seq, vocab, theta, tied) -> dict:
    """The Llama architecture: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases or dropout."""
    return dict(
        _preset(layers, hidden, heads, seq=seq, vocab=vocab),
        ffn_hidden_size=ffn,
        position_embedding_type="rope",
        rotary_base=theta,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        group_query_attention=True,
        num_query_groups=groups,
        disable_bias_linear=True,
        untie_embeddings_and_output_weights=not tied,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


PRESETS: dict[str, dict] = {
    # Small enough for 8 gloo processes on 2 CPU cores.
    "tiny": _preset(4, 64, 4, seq=64, vocab=1024),
    # GPT-3 paper sizes (Brown et al. 2020, table 2.1).
    "125M": _preset(12, 768, 12),
    "1.3B": _preset(24, 2048, 16),
    "7B": _preset(32, 4096, 32),
    # Llama-style at the tiny size: 4 query heads in 2 groups, so TP2 cuts by groups.
    "llama-tiny": _llama_preset(4, 64, 4, 2, 176, seq=64, vocab=1024, theta=10000, tied=False),
    # The published Llama 3.2 1B and Llama 3 8B configurations (Meta's config.json: 128,256-token
    # vocabulary, rope_theta 500,000, rms_norm_eps 1e-5; the 1B ties its embeddings). Pretraining
    # context 8,192; the RoPE scaling of the 3.1/3.2 long-context releases is not modelled.
    "llama3-1B": _llama_preset(16, 2048, 32, 8, 8192, seq=8192, vocab=128256, theta=500000, tied=True),
    "llama3-8B": _llama_preset(32, 4096, 32, 8, 14336, seq=8192, vocab=128256, theta=500000, tied=False),
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
    non_embedding = config.num_parameters(1) - config.embedding_parameters(1)
    dense = 6.0 * tokens * (non_embedding + vocab * h)
    attention = 12.0 * config.num_layers * h * config.seq_length * tokens
    return dense + attention


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class RecomputeConfig:
    """Activations recomputed in the backward pass instead of kept (Megatron-LM's flags): memory
    for time, the same function."""

    recompute_granularity: str | None = flag("--recompute-granularity", None, choices=RECOMPUTE_GRANULARITIES)
    """``full``: keep only the input of each recomputed transformer layer and run it again in the
    backward; ``selective``: recompute only core attention, the activations that grow with the square
    of the sequence. Not given: keep every activation."""
    recompute_method: str | None = flag("--recompute-method", None, choices=RECOMPUTE_METHODS)
    """With ``--recompute-granularity full``: ``uniform`` recomputes the layers of a stage in chunks of
    ``--recompute-num-layers``, ``block`` only the first ``--recompute-num-layers`` layers of each stage."""
    recompute_num_layers: int | None = flag("--recompute-num-layers", None)
    """With ``--recompute-granularity full``: layers per recomputed chunk (``uniform``) or recomputed
    layers per pipeline stage (``block``)."""

    def __post_init__(self) -> None:
        full = self.recompute_granularity == "full"
        if self.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
            raise ValueError(f"--recompute-granularity must be one of {RECOMPUTE_GRANULARITIES}, "
                             f"got {self.recompute_granularity!r}")
        if full and (self.recompute_method is None or self.recompute_num_layers is None):
            raise ValueError("--recompute-granularity full needs --recompute-method uniform|block and "
                             "--recompute-num-layers N")
        if not full and (self.recompute_method is not None or self.recompute_num_layers is not None):
            raise ValueError("--recompute-method and --recompute-num-layers go with --recompute-granularity full")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ValueError(f"--recompute-num-layers must be >= 1, got {self.recompute_num_layers}")

    def transformer_config_kwargs(self) -> dict:
        """megatron-core ``TransformerConfig`` arguments."""
        return dict(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                    recompute_num_layers=self.recompute_num_layers)
