"""Command-line arguments with Megatron-LM's names, turned into a validated :class:`JobConfig`.

Every check runs here, before a process group or a model exists, so an impossible layout or
argument costs the user seconds, not a model build. Errors are ``ValueError`` subclasses
(:class:`ArgumentError`) whose message names the flag and what to do.
"""

from __future__ import annotations

import argparse
import os

from checkpointing.base import CheckpointConfig
from cli.flags import add_flags, flag_name, flag_values
from models.config import PRESETS, GPTModelConfig, RecomputeConfig
from models.fusions import KernelFusions
from models.gpt import transformer_engine_status
from tokenization.data_record import FILE_FLAGS, files_checksum, read_record, record_path
from tokenization.tokenizer import build_tokenizer
from trainer.config import JobConfig, TrainingConfig
from trainer.data import DataConfig, parse_data_path
from trainer.device import cuda_selected
from trainer.lr_schedule import LRScheduleConfig
from trainer.optimizer import OptimizerConfig
from trainer.parallel_dims import ParallelDims
from trainer.rollback_config import RollbackConfig


class ArgumentError(ValueError):
    """The command line asks for something impossible; the message says what to change."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`ArgumentError` instead of exiting: the trainer's entry point
    decides how to report it (rank 0 only), and library callers can catch it."""

    def error(self, message: str):  # type: ignore[override]
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of ``pretrain_gpt.py``, generated from the config fields that declare them
    (:func:`cli.flags.flag`); only ``--model-size`` is not a field (it picks the defaults of others)."""
    p = _Parser(
        prog="pretrain_gpt.py",
        description="Train a GPT with tensor x pipeline x data parallelism (Megatron-LM flags).",
        # Megatron-LM's choice: with abbreviations, --async would silently mean --async-save.
        allow_abbrev=False,
    )
    model = p.add_argument_group("model")
    model.add_argument("--model-size", choices=sorted(PRESETS),
                       help="start from a preset's shape; the shape flags below override it")
    add_flags(model, GPTModelConfig)
    add_flags(p.add_argument_group("fused kernels (CUDA; each is used only where its kernel works)"), KernelFusions)
    add_flags(p.add_argument_group("parallelism"), ParallelDims)
    add_flags(p.add_argument_group("optimizer"), OptimizerConfig)
    add_flags(p.add_argument_group("learning rate"), LRScheduleConfig)
    add_flags(p.add_argument_group("activation recomputation"), RecomputeConfig)
    add_flags(p.add_argument_group("training, logging and evaluation"), TrainingConfig)
    add_flags(p.add_argument_group("rolling back (docs/rolling-back.md)"), RollbackConfig)
    data = p.add_argument_group("data")
    add_flags(data, DataConfig)
    add_flags(data, JobConfig)
    add_flags(p.add_argument_group("checkpointing"), CheckpointConfig)
    return p


def _model_config(args, vocab_size: int) -> GPTModelConfig:
    values = dict(PRESETS[args.model_size]) if args.model_size else {}
    explicit = flag_values(args, GPTModelConfig)
    values.update(explicit)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if name not in values:
            raise ArgumentError(f"{flag_name(GPTModelConfig, name)} is required (or pass --model-size)")
    # Megatron-LM's defaults: 4 x hidden, or with SwiGLU two thirds of it (its gate doubles fc1) in
    # multiples of 64.
    values.setdefault("ffn_hidden_size", int(4 * values["hidden_size"] * 2 / 3 / 64) * 64 if values.get("swiglu")
                      else 4 * values["hidden_size"])
    if "max_position_embeddings" not in explicit:
        # Default: --seq-length, or the preset's table if that is longer.
        values["max_position_embeddings"] = max(values.get("max_position_embeddings", 0), values["seq_length"])
    values["vocab_size"] = vocab_size
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
    if model.group_query_attention and model.num_query_groups % tp:
        raise ArgumentError(
            f"--num-query-groups {model.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}: "
            "each TP rank holds whole key/value groups"
        )
    if dims.sequence_parallel and model.seq_length % tp:
        raise ArgumentError(
            f"--sequence-parallel: --seq-length {model.seq_length} is not divisible by --tensor-model-parallel-size {tp}"
        )


def _take_data_record(args: argparse.Namespace) -> dict | None:
    """The tokenizer ``--data-path`` was prepared with (``tokenization.data_record``; in a blend,
    every prefix's, which must agree): the default for the tokenizer flags left out; a different
    one given is refused, naming both. Sets the flags it supplies on ``args``. Returns the record
    (``max_token_id`` the largest over the blend); None: no data, or data prepared before records
    were written."""
    if not args.data_path:
        return None
    try:
        prefixes = [prefix for _, prefix in parse_data_path(args.data_path)]
        records = {prefix: read_record(prefix) for prefix in prefixes}
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    found = {p: r for p, r in records.items() if r is not None}
    if not found:
        return None
    kinds = {(r["tokenizer_type"], r.get("files_xxh3")) for r in found.values()}
    if len(kinds) > 1 or len(found) < len(records):
        listed = "; ".join(f"{p}: {r['tokenizer_type'] if r else 'no record'}" for p, r in records.items())
        raise ArgumentError(f"the prefixes of --data-path were prepared with different tokenizers ({listed}): a blend "
                            "needs one tokenizer; prepare them again with the same one")
    prefix, record = next(iter(found.items()))
    record = dict(record, max_token_id=max(r["max_token_id"] for r in found.values()))
    where = record_path(prefix)
    recorded = record["tokenizer_type"]
    if args.tokenizer_type is not None and args.tokenizer_type != recorded:
        raise ArgumentError(f"--tokenizer-type {args.tokenizer_type}, but --data-path {prefix} was prepared "
                            f"with {recorded} ({where}): drop --tokenizer-type, or prepare the data again")
    args.tokenizer_type = recorded
    files = record.get("files") or {}
    given = {name: getattr(args, name) for name in FILE_FLAGS if getattr(args, name)}
    if given:
        checksum = files_checksum({name: os.path.abspath(path) for name, path in given.items()})
        if record.get("files_xxh3") and checksum != record["files_xxh3"]:
            named = ", ".join(f"{FILE_FLAGS[n]} {p}" for n, p in given.items())
            recorded_files = ", ".join(f"{FILE_FLAGS[n]} {p}" for n, p in files.items())
            raise ArgumentError(f"{named} differ from the tokenizer --data-path {prefix} was prepared with "
                                f"({recorded_files}; {where}): drop them, or prepare the data again")
    else:
        for name, path in files.items():
            if name in FILE_FLAGS:
                setattr(args, name, path)
    if recorded == "NullTokenizer" and args.vocab_size is None:
        args.vocab_size = record.get("vocab_size")
    record["prefix"] = prefix
    return record


def job_config_from_args(args: argparse.Namespace, world_size: int) -> JobConfig:
    """Validate parsed arguments for a job of ``world_size`` processes.

    Each component config validates its own fields; what is checked here relates fields of
    several components (defaults derived from others, the layout against the model shape).
    """
    try:
        dims = ParallelDims(world_size=world_size, **flag_values(args, ParallelDims))
        training = TrainingConfig(**flag_values(args, TrainingConfig),
                                  fusions=KernelFusions(**flag_values(args, KernelFusions)),
                                  recompute=RecomputeConfig(**flag_values(args, RecomputeConfig)),
                                  rollback=RollbackConfig(**flag_values(args, RollbackConfig)))
        if training.transformer_impl == "transformer_engine":
            reason = (transformer_engine_status() if cuda_selected()
                      else "this run is on the CPU (no GPU, or GPT_FORCE_CPU=1); TransformerEngine runs only on NVIDIA GPUs")
            if reason is not None:
                raise ArgumentError(f"--transformer-impl transformer_engine: {reason}. Use --transformer-impl local.")
        if args.mock_data == (args.data_path is not None):
            raise ArgumentError("pass exactly one of --mock-data and --data-path PREFIX")
        record = _take_data_record(args)
        tokenizer_type = args.tokenizer_type or ("ByteTokenizer" if args.data_path else "NullTokenizer")
        vocab_size = args.vocab_size
        if vocab_size is None and tokenizer_type == "NullTokenizer" and args.model_size:
            vocab_size = PRESETS[args.model_size]["vocab_size"]  # token ids: the preset's vocabulary
        if args.mock_data and vocab_size is None:
            raise ArgumentError("--mock-data needs --vocab-size (or a --model-size preset's)")
        files_flag = {"GPT2BPETokenizer": "--vocab-file", "HuggingFaceTokenizer": "--tokenizer-model"}.get(tokenizer_type)
        if files_flag and args.vocab_size is not None:
            raise ArgumentError(f"--vocab-size with --tokenizer-type {tokenizer_type}: the vocabulary is {files_flag}'s; "
                                "drop --vocab-size")
        # Absolute paths: the checkpoint records them, and scripts/convert_checkpoint.py finds the
        # tokenizer files there from any working directory. build_tokenizer refuses a file flag of
        # another tokenizer type, and HuggingFaceTokenizer without --tokenizer-model.
        vocab_file, merge_file, tokenizer_model = (os.path.abspath(f) if f else None
                                                   for f in (args.vocab_file, args.merge_file, args.tokenizer_model))
        tokenizer = build_tokenizer(tokenizer_type, vocab_size, vocab_file, merge_file, tokenizer_model)
        if args.vocab_size is not None and args.vocab_size != tokenizer.vocab_size:
            raise ArgumentError(
                f"--vocab-size {args.vocab_size} disagrees with {tokenizer_type}'s vocabulary of "
                f"{tokenizer.vocab_size}; drop --vocab-size"
            )
        if record is not None and tokenizer.vocab_size <= record["max_token_id"]:
            raise ArgumentError(
                f"--data-path {' '.join(args.data_path)} holds token id {record['max_token_id']}, but this run's "
                f"vocabulary ({tokenizer_type}) has {tokenizer.vocab_size} entries: give the tokenizer the data was "
                f"prepared with ({record_path(record['prefix'])})")
        model = _model_config(args, tokenizer.vocab_size)
        _check_layout(model, dims)
        data_values = flag_values(args, DataConfig)
        micro_batch = data_values["micro_batch_size"]
        if micro_batch <= 0:
            raise ArgumentError(f"--micro-batch-size must be positive, got {micro_batch}")
        data_values.setdefault("global_batch_size", micro_batch * dims.data_parallel)
        if data_values["global_batch_size"] % (micro_batch * dims.data_parallel):
            raise ArgumentError(
                f"--global-batch-size {data_values['global_batch_size']} is not divisible by --micro-batch-size "
                f"{micro_batch} x data-parallel size {dims.data_parallel} "
                f"(= world {world_size} / (TP {dims.tensor_parallel} x PP {dims.pipeline_parallel}))"
            )
        data = DataConfig(seq_length=model.seq_length, **data_values)
        optimizer = OptimizerConfig(**flag_values(args, OptimizerConfig))
        lr_values = flag_values(args, LRScheduleConfig)
        lr_values.setdefault("decay_iters", training.train_iters)
        lr = LRScheduleConfig(**lr_values)
        checkpoint = CheckpointConfig(**flag_values(args, CheckpointConfig))
        if training.rollback.rollback_on_spike and not (checkpoint.async_save and checkpoint.save):
            raise ArgumentError("--rollback-on-spike rolls back to versions the job holds: it needs --async-save "
                                "and --save")
        if optimizer.cpu_offload and training.bf16 and checkpoint.async_save:
            raise ArgumentError("--optimizer-cpu-offload with --bf16 and --async-save is not supported yet: the "
                                "snapshot would hold host main weights and device bf16 weights; drop one of them "
                                "(fp32 with offload takes zero-copy snapshots)")
    except ArgumentError:
        raise
    except ValueError as error:  # a component config refused a value
        raise ArgumentError(str(error)) from None
    return JobConfig(model, dims, data, optimizer, lr, training, tokenizer_type, checkpoint,
                     vocab_file=vocab_file, merge_file=merge_file, tokenizer_model=tokenizer_model)


def parse_job_config(argv: list[str] | None = None, world_size: int | None = None) -> JobConfig:
    """Parse and validate; ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without it)."""
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return job_config_from_args(args, world_size)
