"""The whole job's configuration: one typed config per component."""

from __future__ import annotations

from dataclasses import dataclass

from checkpointing.base import CheckpointConfig
from cli.flags import flag, flag_name
from models.config import GPTModelConfig, RecomputeConfig
from models.fusions import KernelFusions
from models.gpt import ATTENTION_BACKENDS, TRANSFORMER_IMPLS, check_attention_backend, default_attention_backend
from tokenization.tokenizer import TOKENIZER_TYPES
from trainer.data import DataConfig
from trainer.lr_schedule import LRScheduleConfig
from trainer.optimizer import OptimizerConfig
from trainer.parallel_dims import ParallelDims
from trainer.rollback_config import RollbackConfig


@dataclass(frozen=True)
class TrainingConfig:
    """How long to train, and what to report."""

    train_iters: int = flag("--train-iters", required=True)
    """Iterations to train."""
    exit_interval: int | None = flag("--exit-interval", None)
    """Stop after an iteration that is a multiple of this."""
    log_interval: int = flag("--log-interval", 100)
    """A console line and TensorBoard scalars every this many iterations."""
    eval_interval: int | None = flag("--eval-interval", None)
    """Evaluate on the validation split every this many iterations."""
    eval_iters: int = flag("--eval-iters", 10)
    """Global batches per evaluation."""
    tensorboard_dir: str | None = flag("--tensorboard-dir", None)
    """Where TensorBoard event files go."""
    trace_dir: str | None = flag("--trace-dir", None)
    """A Chrome trace (Perfetto) per rank of training and checkpoint phases goes here."""
    metrics_file: str | None = flag("--metrics-file", None)
    """The logging rank (the last, which has the loss) appends one JSON object per logged iteration
    and one for the end-of-run summary to this
    file: what benchmarks and tools read instead of the console."""
    seed: int = flag("--seed", 1234)
    """Seeds weights, dropout and the data order."""
    bf16: bool = flag("--bf16", False)
    """Model parameters and activations in bfloat16, fp32 main weights and Adam moments."""
    transformer_impl: str = flag("--transformer-impl", "local", choices=TRANSFORMER_IMPLS)
    """Layer spec: ``local`` (megatron-core's plain-torch spec) or ``transformer_engine`` (CUDA and
    TransformerEngine)."""
    attention_backend: str | None = flag("--attention-backend", None, choices=ATTENTION_BACKENDS,
                                         derived="the layer spec's")
    """Core attention: ``sdpa`` (torch's fused scaled_dot_product_attention),
    ``local`` (megatron's unfused DotProductAttention) or ``transformer_engine`` (TE's own, the only
    one with ``transformer_impl='transformer_engine'``). None (not given) becomes the layer spec's
    default: ``sdpa`` with the local spec, ``transformer_engine`` with TE's."""
    fusions: KernelFusions = KernelFusions()
    """megatron-core's fused kernels asked for (:class:`KernelFusions` declares their flags); each is
    used only where it works on the run's device."""
    recompute: RecomputeConfig = RecomputeConfig()
    """Activation recomputation (:class:`models.config.RecomputeConfig` declares its flags)."""
    rollback: RollbackConfig = RollbackConfig()
    """Iterations to skip and rollbacks past loss spikes (:class:`RollbackConfig` declares its flags)."""
    distributed_timeout_minutes: float = flag("--distributed-timeout-minutes", 10.0)
    """A collective that waits longer than this fails, so a dead rank ends the job instead of
    hanging it."""

    def __post_init__(self) -> None:
        if self.attention_backend is None:
            object.__setattr__(self, "attention_backend", default_attention_backend(self.transformer_impl))
        check_attention_backend(self.transformer_impl, self.attention_backend)
        if self.train_iters < 1:
            raise ValueError(f"--train-iters must be >= 1, got {self.train_iters}")
        for name in ("exit_interval", "eval_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag_name(self, name)} must be >= 1, got {value}")
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.distributed_timeout_minutes <= 0:
            raise ValueError(f"--distributed-timeout-minutes must be > 0, got {self.distributed_timeout_minutes}")
        if self.eval_iters < 0:
            raise ValueError(f"--eval-iters must be >= 0, got {self.eval_iters}")


@dataclass(frozen=True)
class JobConfig:
    """Everything :func:`trainer.training.pretrain` needs."""

    model: GPTModelConfig
    parallel: ParallelDims
    data: DataConfig
    optimizer: OptimizerConfig
    lr: LRScheduleConfig
    training: TrainingConfig
    tokenizer_type: str = flag("--tokenizer-type", "NullTokenizer", choices=TOKENIZER_TYPES,
                               derived="ByteTokenizer with --data-path, NullTokenizer with --mock-data")
    """ByteTokenizer for text prepared with it; NullTokenizer with ``--vocab-size``; GPT2BPETokenizer
    with ``--vocab-file`` and ``--merge-file``; HuggingFaceTokenizer with ``--tokenizer-model``."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    vocab_file: str | None = flag("--vocab-file", None)
    """GPT2BPETokenizer's vocab.json (GPT-2's, or ``scripts/prepare_data.py --train-tokenizer``'s);
    made absolute and recorded in checkpoints, so that an export to Hugging Face finds it."""
    merge_file: str | None = flag("--merge-file", None)
    """GPT2BPETokenizer's merges.txt; made absolute."""
    tokenizer_model: str | None = flag("--tokenizer-model", None, metavar="DIR")
    """HuggingFaceTokenizer's local directory holding ``tokenizer.json`` (a ``transformers``
    ``save_pretrained`` directory, or ``scripts/prepare_data.py --train-tokenizer``'s); nothing is
    downloaded. Made absolute and recorded in checkpoints, so that an export finds it."""
