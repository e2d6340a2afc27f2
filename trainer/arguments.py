"""Command-line arguments with Megatron-LM's names, turned into a validated :class:`JobConfig`.

Every check runs here, before a process group or a model exists, so an impossible layout or
argument costs the user seconds, not a model build. Errors are ``ValueError`` subclasses
(:class:`ArgumentError`) whose message names the flag and what to do.
"""

from __future__ import annotations

import argparse
import os

from models.config import PRESETS, GPTModelConfig
from models.fusions import KernelFusions
from models.gpt import (
    ATTENTION_BACKENDS,
    TRANSFORMER_IMPLS,
    check_attention_backend,
    default_attention_backend,
    transformer_engine_status,
)
from checkpointing.config import CheckpointConfig
from trainer.config import JobConfig, TrainingConfig
from trainer.data import DataConfig
from trainer.device import cuda_selected
from trainer.lr_schedule import DECAY_STYLES, LRScheduleConfig
from trainer.optimizer import OptimizerConfig
from trainer.parallel_dims import ParallelDims
from trainer.tokenizer import TOKENIZER_TYPES, build_tokenizer


class ArgumentError(ValueError):
    """The command line asks for something impossible; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Train a GPT with tensor x pipeline x data parallelism (Megatron-LM flags).",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model-size", choices=sorted(PRESETS), help="start from a preset; flags below override it")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--ffn-hidden-size", type=int, help="default: 4 x --hidden-size")
    m.add_argument("--seq-length", type=int)
    m.add_argument("--max-position-embeddings", type=int, help="default: --seq-length")
    m.add_argument("--vocab-size", type=int, help="vocabulary of --mock-data and NullTokenizer")
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    m.add_argument("--hidden-dropout", type=float, default=0.1)
    m.add_argument("--attention-dropout", type=float, default=0.1)
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local")
    m.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None,
                   help="core attention: sdpa (torch's fused scaled_dot_product_attention; the default with "
                        "--transformer-impl local), local (megatron's unfused DotProductAttention), "
                        "transformer_engine (the default and only choice with --transformer-impl transformer_engine)")
    m.add_argument("--bf16", action="store_true", help="bfloat16 parameters, fp32 main weights")
    fu = p.add_argument_group("fused kernels (CUDA; each is used only where its kernel works)")
    fu.add_argument("--bias-gelu-fusion", dest="bias_gelu_fusion", action="store_true", default=False,
                    help="fused bias+GELU: megatron's kernel is the tanh approximation of GELU, so this "
                         "changes the model's function (off by default, unlike Megatron-LM)")
    fu.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                    help="the default here (accepted for Megatron-LM command lines)")
    fu.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false",
                    help="do not fuse bias+dropout+add (fused with torch.compile where it works)")
    fu.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false",
                    help="do not use Apex's fused softmax kernels (used only where they import)")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO-1 over DP ranks")
    par.add_argument("--optimizer-cpu-offload", action="store_true",
                     help="fp32 main weights and Adam moments in host memory, the Adam step on the host")
    par.add_argument("--optimizer-shard-size-mb", type=float, default=64.0,
                     help="optimizer-state shard size (the unit of checkpoint fences)")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--global-batch-size", type=int, help="default: micro batch x DP size")
    t.add_argument("--train-iters", type=int, required=True)
    t.add_argument("--exit-interval", type=int)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective that waits longer than this fails instead of hanging")
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="linear")
    t.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)

    d = p.add_argument_group("data")
    d.add_argument("--mock-data", action="store_true", help="deterministic synthetic tokens")
    d.add_argument("--data-path", help="prefix of PREFIX.bin/PREFIX.idx (scripts/prepare_data.py)")
    d.add_argument("--split", default="969,30,1", help="train,valid,test weights of --data-path")
    d.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="ByteTokenizer for text prepared with it; NullTokenizer with --vocab-size; "
                        "GPT2BPETokenizer with --vocab-file and --merge-file")
    d.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json (GPT-2's, or scripts/prepare_data.py --train-tokenizer's)")
    d.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")

    lg = p.add_argument_group("logging and evaluation")
    lg.add_argument("--log-interval", type=int, default=100)
    lg.add_argument("--tensorboard-dir")
    lg.add_argument("--trace-dir", help="write a Chrome trace (Perfetto) per rank of training and checkpoint phases")
    lg.add_argument("--metrics-file", help="rank 0 appends a JSON object per logged iteration and one for the summary here")
    lg.add_argument("--eval-interval", type=int)
    lg.add_argument("--eval-iters", type=int, default=10)

    c = p.add_argument_group("checkpointing")
    c.add_argument("--save", help="persistent checkpoint directory (L2)")
    c.add_argument("--save-interval", type=int, help="checkpoint every N iterations (L0 with --async-save)")
    c.add_argument("--load", help="resume from the newest committed checkpoint here")
    c.add_argument("--ckpt-step", type=int, help="load exactly this iteration")
    c.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist")
    c.add_argument("--save-retain-last", type=int, help="keep the newest N committed checkpoints in --save")
    c.add_argument("--no-verify-checkpoint-checksums", dest="verify_checksums", action="store_false")
    c.add_argument("--no-load-optim", dest="load_optim", action="store_false")
    c.add_argument("--no-load-rng", dest="load_rng", action="store_false")
    c.add_argument("--trust-checkpoint-pickles", dest="trust_pickles", action="store_true",
                   help="load the pickled small objects of a checkpoint of an older format (runs code from the "
                        "checkpoint: only for your own checkpoints)")
    c.add_argument("--finetune", action="store_true",
                   help="load the model weights only: iteration 0, data from the start, a fresh optimizer")
    c.add_argument("--async-save", action="store_true", help="asynchronous multi-level checkpointing")
    c.add_argument("--ckpt-keep-host-pool", dest="keep_host_pool", action="store_true",
                   help="keep the L0 pool in shared memory after a normal end (freed by default)")
    c.add_argument("--ckpt-snapshot", dest="snapshot", choices=("auto", "zero-copy", "copy"), default="auto",
                   help="L0 snapshots: zero-copy (the optimizer step writes into the pool; host fp32 state), "
                        "copy (copied beside the next step), auto (zero-copy where it can)")
    c.add_argument("--ckpt-host-versions", type=int, default=2, help="L0: versions in the host pool")
    c.add_argument("--ckpt-host-budget-gb", type=float, help="L0: byte budget of the host pool")
    c.add_argument("--ckpt-host-dir", default="/dev/shm", help="L0: tmpfs directory of the host pool (per node)")
    c.add_argument("--ckpt-local-dir", help="L1: node-local checkpoint directory")
    c.add_argument("--ckpt-local-interval", type=int, help="L1: flush every N iterations")
    c.add_argument("--ckpt-local-retain-last", type=int, default=2, help="L1: committed checkpoints kept")
    c.add_argument("--ckpt-persistent-interval", type=int, help="L2: flush every N iterations (default --save-interval)")
    c.add_argument("--ckpt-write-rate-limit", type=float, metavar="MB_PER_S",
                   help="L1/L2: write at most this many MB/s per rank (fewer versions persist, training is "
                        "disturbed less); default: no limit")
    c.add_argument("--ckpt-flusher-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop training with an error when this rank's checkpoint flusher process shows no sign "
                        "of life (or, while training waits on it, no progress) for this long")
    return p


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise ArgumentError(f"--split {text!r}: expected three numbers such as 969,30,1") from None
    if len(parts) != 3:
        raise ArgumentError(f"--split {text!r}: expected three numbers such as 969,30,1")
    return parts  # type: ignore[return-value]


def _model_config(args, vocab_size: int) -> GPTModelConfig:
    values = dict(PRESETS[args.model_size]) if args.model_size else {}
    explicit = {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "ffn_hidden_size": args.ffn_hidden_size,
        "seq_length": args.seq_length,
        "max_position_embeddings": args.max_position_embeddings,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if name not in values:
            raise ArgumentError(f"--{name.replace('_', '-')} is required (or pass --model-size)")
    values.setdefault("ffn_hidden_size", 4 * values["hidden_size"])
    if args.max_position_embeddings is None:
        # Default: --seq-length, or the preset's table if that is longer.
        values["max_position_embeddings"] = max(values.get("max_position_embeddings", 0), values["seq_length"])
    values.update(
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
    )
    return GPTModelConfig(**values)


def _check_layout(model: GPTModelConfig, dims: ParallelDims) -> None:
    tp, pp = dims.tensor_parallel, dims.pipeline_parallel
    if model.num_layers % pp:
        raise ArgumentError(
            f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )
    if model.num_attention_heads % tp:
        raise ArgumentError(
            f"--num-attention-heads {model.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if model.ffn_hidden_size % tp:
        raise ArgumentError(
            f"--ffn-hidden-size {model.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}"
        )


def job_config_from_args(args: argparse.Namespace, world_size: int) -> JobConfig:
    """Validate parsed arguments for a job of ``world_size`` processes."""
    try:
        dims = ParallelDims(
            world_size=world_size,
            tensor_parallel=args.tensor_model_parallel_size,
            pipeline_parallel=args.pipeline_model_parallel_size,
        )
        attention_backend = args.attention_backend or default_attention_backend(args.transformer_impl)
        # Before TE's availability: a contradiction is the user's to fix on any machine.
        check_attention_backend(args.transformer_impl, attention_backend)  # ValueError -> ArgumentError below
        if args.transformer_impl == "transformer_engine":
            reason = (transformer_engine_status() if cuda_selected()
                      else "this run is on the CPU (no GPU, or GPT_FORCE_CPU=1); TransformerEngine runs only on NVIDIA GPUs")
            if reason is not None:
                raise ArgumentError(f"--transformer-impl transformer_engine: {reason}. Use --transformer-impl local.")
        if args.mock_data == (args.data_path is not None):
            raise ArgumentError("pass exactly one of --mock-data and --data-path PREFIX")
        tokenizer_type = args.tokenizer_type or ("ByteTokenizer" if args.data_path else "NullTokenizer")
        if args.mock_data and args.vocab_size is None:
            raise ArgumentError("--mock-data needs --vocab-size")
        if tokenizer_type == "GPT2BPETokenizer" and args.vocab_size is not None:
            raise ArgumentError("--vocab-size with --tokenizer-type GPT2BPETokenizer: the vocabulary is --vocab-file's; "
                                "drop --vocab-size")
        # Absolute paths: the checkpoint records them, and scripts/convert_checkpoint.py finds the
        # tokenizer files there from any working directory.
        vocab_file, merge_file = (os.path.abspath(f) if f else None for f in (args.vocab_file, args.merge_file))
        tokenizer = build_tokenizer(tokenizer_type, args.vocab_size, vocab_file, merge_file)
        if args.vocab_size is not None and args.vocab_size != tokenizer.vocab_size:
            raise ArgumentError(
                f"--vocab-size {args.vocab_size} disagrees with {tokenizer_type}'s vocabulary of "
                f"{tokenizer.vocab_size}; drop --vocab-size"
            )
        model = _model_config(args, tokenizer.vocab_size)
        _check_layout(model, dims)
        if args.micro_batch_size <= 0:
            raise ArgumentError(f"--micro-batch-size must be positive, got {args.micro_batch_size}")
        global_batch = args.global_batch_size or args.micro_batch_size * dims.data_parallel
        if global_batch % (args.micro_batch_size * dims.data_parallel):
            raise ArgumentError(
                f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
                f"{args.micro_batch_size} x data-parallel size {dims.data_parallel} "
                f"(= world {world_size} / (TP {dims.tensor_parallel} x PP {dims.pipeline_parallel}))"
            )
        data = DataConfig(
            seq_length=model.seq_length,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=global_batch,
            seed=args.seed,
            mock_data=args.mock_data,
            data_path=args.data_path,
            split=_split(args.split),
        )
        optimizer = OptimizerConfig(
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            use_distributed_optimizer=args.use_distributed_optimizer,
            shard_size_mb=args.optimizer_shard_size_mb,
            cpu_offload=args.optimizer_cpu_offload,
        )
        training = TrainingConfig(
            train_iters=args.train_iters,
            exit_interval=args.exit_interval,
            log_interval=args.log_interval,
            eval_interval=args.eval_interval,
            eval_iters=args.eval_iters,
            tensorboard_dir=args.tensorboard_dir,
            trace_dir=args.trace_dir,
            metrics_file=args.metrics_file,
            seed=args.seed,
            bf16=args.bf16,
            transformer_impl=args.transformer_impl,
            attention_backend=attention_backend,
            fusions=KernelFusions(bias_gelu=args.bias_gelu_fusion, bias_dropout=args.bias_dropout_fusion,
                                  masked_softmax=args.masked_softmax_fusion),
            distributed_timeout_minutes=args.distributed_timeout_minutes,
        )
        lr = LRScheduleConfig(
            lr=args.lr,
            min_lr=args.min_lr,
            warmup_iters=args.lr_warmup_iters,
            decay_iters=args.lr_decay_iters or args.train_iters,
            decay_style=args.lr_decay_style,
        )
        checkpoint = CheckpointConfig(
            save=args.save,
            save_interval=args.save_interval,
            load=args.load,
            ckpt_step=args.ckpt_step,
            ckpt_format=args.ckpt_format,
            save_retain_last=args.save_retain_last,
            verify_checksums=args.verify_checksums,
            load_optim=args.load_optim,
            load_rng=args.load_rng,
            finetune=args.finetune,
            snapshot=args.snapshot,
            keep_host_pool=args.keep_host_pool,
            trust_pickles=args.trust_pickles,
            async_save=args.async_save,
            host_versions=args.ckpt_host_versions,
            host_budget_gb=args.ckpt_host_budget_gb,
            host_dir=args.ckpt_host_dir,
            local_dir=args.ckpt_local_dir,
            local_interval=args.ckpt_local_interval,
            local_retain_last=args.ckpt_local_retain_last,
            persistent_interval=args.ckpt_persistent_interval,
            write_rate_limit_mb=args.ckpt_write_rate_limit,
            flusher_timeout=args.ckpt_flusher_timeout,
        )
        if optimizer.cpu_offload and training.bf16 and checkpoint.async_save:
            raise ArgumentError("--optimizer-cpu-offload with --bf16 and --async-save is not supported yet: the "
                                "snapshot would hold host main weights and device bf16 weights; drop one of them "
                                "(fp32 with offload takes zero-copy snapshots)")
    except ArgumentError:
        raise
    except ValueError as error:  # a component config refused a value
        raise ArgumentError(str(error)) from None
    return JobConfig(model, dims, data, optimizer, lr, training, tokenizer_type, checkpoint,
                     vocab_file=vocab_file, merge_file=merge_file)


def parse_job_config(argv: list[str] | None = None, world_size: int | None = None) -> JobConfig:
    """Parse and validate; ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without it)."""
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return job_config_from_args(args, world_size)
