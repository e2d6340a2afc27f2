"""The whole job's configuration: one typed config per component."""

from __future__ import annotations

from dataclasses import dataclass

from checkpointing.config import CheckpointConfig
from models.config import GPTModelConfig
from models.fusions import KernelFusions
from models.gpt import check_attention_backend, default_attention_backend
from trainer.data import DataConfig
from trainer.lr_schedule import LRScheduleConfig
from trainer.optimizer import OptimizerConfig
from trainer.parallel_dims import ParallelDims


@dataclass(frozen=True)
class TrainingConfig:
    """How long to train, and what to report."""

    train_iters: int
    """Iterations to train (``--train-iters``)."""
    exit_interval: int | None = None
    """Stop after an iteration that is a multiple of this (``--exit-interval``)."""
    log_interval: int = 100
    """Console line and TensorBoard scalars every this many iterations (``--log-interval``)."""
    eval_interval: int | None = None
    """Evaluate on the validation split every this many iterations (``--eval-interval``)."""
    eval_iters: int = 10
    """Global batches per evaluation (``--eval-iters``)."""
    tensorboard_dir: str | None = None
    """Where TensorBoard event files go (``--tensorboard-dir``)."""
    trace_dir: str | None = None
    """A Chrome trace (Perfetto) per rank of training and checkpoint phases goes here (``--trace-dir``)."""
    metrics_file: str | None = None
    """Rank 0 appends one JSON object per logged iteration and one for the end-of-run summary to this
    file (``--metrics-file``): what benchmarks and tools read instead of the console."""
    seed: int = 1234
    """Seeds weights, dropout and the data order (``--seed``)."""
    bf16: bool = False
    """Model parameters and activations in bfloat16, fp32 main weights (``--bf16``)."""
    transformer_impl: str = "local"
    """Layer spec: ``local`` (plain torch) or ``transformer_engine`` (``--transformer-impl``)."""
    attention_backend: str | None = None
    """Core attention (``--attention-backend``): ``sdpa`` (torch's fused scaled_dot_product_attention),
    ``local`` (megatron's unfused DotProductAttention) or ``transformer_engine`` (TE's own, the only
    one with ``transformer_impl='transformer_engine'``). None (not given) becomes the layer spec's
    default: ``sdpa`` with the local spec, ``transformer_engine`` with TE's."""
    fusions: KernelFusions = KernelFusions()
    """megatron-core's fused kernels asked for (``--bias-gelu-fusion``, ``--no-bias-dropout-fusion``,
    ``--no-masked-softmax-fusion``); each is used only where it works on the run's device."""
    distributed_timeout_minutes: float = 10.0
    """A collective that waits longer fails, so a dead rank ends the job instead of hanging it."""

    def __post_init__(self) -> None:
        if self.attention_backend is None:
            object.__setattr__(self, "attention_backend", default_attention_backend(self.transformer_impl))
        check_attention_backend(self.transformer_impl, self.attention_backend)
        if self.train_iters < 1:
            raise ValueError(f"--train-iters must be >= 1, got {self.train_iters}")
        for name in ("exit_interval", "eval_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
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
    tokenizer_type: str = "NullTokenizer"
    """``--tokenizer-type``: ByteTokenizer, NullTokenizer or GPT2BPETokenizer."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    vocab_file: str | None = None
    """GPT2BPETokenizer's vocab.json (``--vocab-file``), absolute; recorded in checkpoints so that
    an export to Hugging Face finds the tokenizer."""
    merge_file: str | None = None
    """GPT2BPETokenizer's merges.txt (``--merge-file``), absolute."""
