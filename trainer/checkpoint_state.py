"""The trainer's state as the checkpoint layer sees it (``checkpointing.format.items``).

Saved, per optimizer piece (a row-rectangle of one parameter in one optimizer shard):
``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<param>`` and the model weight ``<param>``.
With fp32 weights the model weight record points at the main weights' bytes (the same values:
the step copies them over), so it costs no extra bytes; with bf16 the cast weights are saved.

Loaded: every local parameter (all replicas, the tied copy included) as a rectangle of its
global tensor, and this rank's optimizer pieces; any layout that saved them will do.

The vocabulary's padding belongs to a layout, not to the model (``models.vocab``): tensors with
a vocabulary dimension are saved and loaded with the true vocabulary's rows only, and the
padded rows of this layout are zero after any load. So a checkpoint loads into any TP degree.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch

from checkpointing.base import CheckpointMismatchError, ParallelLayout
from checkpointing.format import LoadedParts, TensorPiece, keys
from models.param_layout import GlobalParamSpec
from models.vocab import VOCAB_PARAMS, true_vocab_rows
from trainer.flat_buffers import ParamSpan
from trainer.optimizer_pieces import optimizer_state_pieces

OPTIMIZER_ARRAYS = ("fp32_param", "exp_avg", "exp_avg_sq")
MAX_LISTED_CHANGES = 12
"""Settings that differ from the checkpoint's, listed one by one at load (then counted)."""


def _true_rows(piece: TensorPiece, vocab_size: int) -> TensorPiece | None:
    """``piece`` cut to the true vocabulary's rows (None if it holds padding only); other
    parameters' pieces are returned as they are."""
    rows = true_vocab_rows(piece.key, vocab_size)
    if rows is None or piece.global_shape[0] == rows:
        return piece
    keep = min(piece.shape[0], rows - piece.global_offset[0])
    if keep <= 0:
        return None
    return dataclasses.replace(piece, shape=(keep, *piece.shape[1:]), global_shape=(rows, *piece.global_shape[1:]))


def checkpoint_pieces(optimizer_pieces: list[TensorPiece], spans: list[ParamSpan], specs: dict[str, GlobalParamSpec],
                      vocab_size: int, bf16: bool) -> tuple[list[TensorPiece], list[TensorPiece]]:
    """(save pieces, load pieces) of a rank from its optimizer pieces and flat spans, with no
    tensor: the trainer's state and the scale simulator (``benchmarks.scale``) both call it."""
    save_pieces: list[TensorPiece] = []
    load_pieces: list[TensorPiece] = []
    for piece in optimizer_pieces:
        piece = _true_rows(piece, vocab_size)
        if piece is None:
            continue
        for array in OPTIMIZER_ARRAYS:
            state_piece = dataclasses.replace(piece, key=keys.optimizer_key(array, piece.key), array=array)
            save_pieces.append(state_piece)
            load_pieces.append(state_piece)
        save_pieces.append(dataclasses.replace(piece, array="param" if bf16 else "fp32_param"))
    for span in spans:
        spec = specs[span.name]
        piece = _true_rows(TensorPiece(key=spec.global_name, array="param", start=span.start, shape=span.shape,
                                       global_shape=spec.global_shape, global_offset=spec.global_offset),
                           vocab_size)
        if piece is not None:
            load_pieces.append(piece)
    return save_pieces, load_pieces


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for name, value in tree.items():
            out.update(_flatten(value, f"{prefix}{name}."))
        return out
    return {prefix[:-1]: tree}


def changed_settings(saved_args: dict, current_args: dict) -> list[str]:
    """``section.name: saved -> now`` for every setting (checkpoint paths aside) that differs."""
    saved, now = _flatten(saved_args), _flatten(current_args)
    changes = []
    for name in sorted(set(saved) | set(now)):
        if name.startswith("checkpoint."):
            continue  # where to load and save from is expected to change
        if name not in saved and (name.split(".", 1)[0] not in saved_args or now.get(name) is None):
            continue  # a section the checkpoint never recorded (an import), or a setting added since, unset
        before, after = saved.get(name, "(not recorded)"), now.get(name, "(not set)")
        if before != after:
            changes.append(f"{name}: {before} -> {after}")
    return changes


class TrainerCheckpointState:
    """Implements :class:`checkpointing.format.items.CheckpointableState` for a :class:`Trainer`."""

    def __init__(self, trainer):
        self.trainer = trainer
        opt, buffers = trainer.optimizer, trainer.buffers
        self.rank = trainer.groups.rank
        self.vocab_size = trainer.job.model.vocab_size
        self.bf16 = buffers.params.dtype != torch.float32
        self.shards = [(s.start - opt.start, s.end - opt.start) for s in opt.shards]
        self.save_pieces, self.load_pieces = checkpoint_pieces(
            optimizer_state_pieces(opt, trainer.param_specs, trainer.groups.dp_rank), buffers.spans,
            trainer.param_specs, self.vocab_size, self.bf16)
        self.padding = self._padding_regions()
        """(array of ``load_arrays``, start, end): this layout's padded vocabulary rows."""
        self.legacy_padded_keys = frozenset(
            k for name in VOCAB_PARAMS for k in (name, *(keys.optimizer_key(a, name) for a in OPTIMIZER_ARRAYS)))
        self._job_dict = dataclasses.asdict(trainer.job)  # frozen: converted once, not at every request
        self.schedule_from_checkpoint = False
        """Set by a live rollback around its restore: the version's own LR schedule comes back."""
        self.layout = ParallelLayout(
            tensor_parallel=trainer.job.parallel.tensor_parallel,
            pipeline_parallel=trainer.job.parallel.pipeline_parallel,
            data_parallel=trainer.job.parallel.data_parallel,
            distributed_optimizer=opt.distributed,
            num_layers=trainer.job.model.num_layers,
            bf16=self.bf16,
        )

    @property
    def zero_copy_refusal(self) -> str | None:
        """Why the optimizer cannot write its steps into the host pool (None: it can)."""
        main = self.trainer.optimizer.main_params
        if main.device.type != "cpu":
            return (f"the optimizer's state is on {main.device.type}: there the snapshot is a device-to-host copy on a "
                    "copy stream")
        if self.bf16:
            return "the model's weights are not fp32 (their cast copy is saved too): zero-copy covers fp32 runs"
        return None

    @property
    def arrays(self) -> dict[str, torch.Tensor]:
        """The optimizer's live arrays (with zero-copy snapshots they move to another slot of the
        host pool at every step: asked for each time)."""
        opt = self.trainer.optimizer
        arrays = {"fp32_param": opt.main_params, "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}
        if self.bf16:
            arrays["param"] = self.trainer.buffers.params[opt.start : opt.end]
        return arrays

    def adopt_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        opt = self.trainer.optimizer
        opt.main_params, opt.exp_avg, opt.exp_avg_sq = arrays["fp32_param"], arrays["exp_avg"], arrays["exp_avg_sq"]

    def model_flag_differences(self, saved_args: dict) -> list[str]:
        from cli.flags import flag_name
        from models.config import GPTModelConfig

        saved, now = saved_args.get("model", {}), self._job_dict["model"]
        differ = []
        for name in sorted(set(saved) & set(now)):
            if saved[name] != now[name]:
                try:
                    flag = flag_name(GPTModelConfig, name)
                except TypeError:  # a field without a flag of its own
                    flag = name
                differ.append(f"{flag}: {saved[name]} saved, {now[name]} now")
        return differ

    def job_changed(self) -> None:
        """The trainer's job configuration was replaced (a live rollback's new LR schedule or
        skipped iterations): checkpoints record the new one."""
        self._job_dict = dataclasses.asdict(self.trainer.job)

    @property
    def load_arrays(self) -> dict[str, torch.Tensor]:
        return dict(self.arrays, param=self.trainer.buffers.params)

    def _padding_regions(self) -> list[tuple[str, int, int]]:
        opt, buffers = self.trainer.optimizer, self.trainer.buffers
        regions = []
        for span in buffers.spans:
            spec = self.trainer.param_specs[span.name]
            rows = true_vocab_rows(spec.global_name, self.vocab_size)
            if rows is None:
                continue
            first_padded = min(max(rows - spec.global_offset[0], 0), span.shape[0])
            a, b = span.start + first_padded * span.row_numel, span.end
            if a >= b:
                continue
            regions.append(("param", a, b))
            lo, hi = max(a, opt.start), min(b, opt.end)
            if lo < hi:
                regions += [(array, lo - opt.start, hi - opt.start) for array in OPTIMIZER_ARRAYS]
        return regions

    # -- the small state ---------------------------------------------------------------------------
    def capture_small_state(self, iteration: int) -> dict[str, Any]:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        t = self.trainer
        small_state: dict[str, Any] = {
            keys.rng_key(self.rank): {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "device": t.device_ctx.get_rng_state(),
                "device_type": t.device_ctx.device.type,
                "tracker": get_cuda_rng_tracker().get_states(),
            }
        }
        if self.rank == 0:
            small_state[keys.COMMON] = {
                "iteration": iteration,
                "consumed_samples": iteration * t.job.data.global_batch_size,
                "optimizer_step": t.optimizer.step_count,
                "skipped_steps": t.optimizer.skipped_steps,
                "iterations_to_skip": sorted(t.iterations_to_skip),
                "layout": self.layout.to_dict(),
                "device": t.device_ctx.device.type,
                "args": self._job_dict,
            }
        return small_state

    # -- after a load ------------------------------------------------------------------------------
    def after_load(self, small_state: dict[str, Any], loaded: LoadedParts) -> list[str]:
        """Re-sync the trainer after any load (L0, node-local, shared; see ``LoadedParts``).

        - The padded vocabulary rows of this layout are zeroed everywhere.
        - The model's parameters and the optimizer's fp32 main weights are made one state: the
          parameters from the main weights when those were restored, else the main weights
          from the parameters (Megatron-LM's ``reload_model_params``: with ``--no-load-optim`` a
          bf16 run continues from its bf16 weights).
        - Without optimizer state, Adam starts afresh (moments and step count zero).
        """
        t, opt = self.trainer, self.trainer.optimizer
        common = small_state[keys.COMMON]
        self._check_same_model(common)
        with torch.no_grad():
            live = self.load_arrays
            for array, a, b in self.padding:
                live[array][a:b].zero_()
            if loaded.weights_in_arrays:
                opt.publish_main_params()
            if loaded.resume:  # a resumed run skips what the saved run was told to skip
                t.iterations_to_skip |= set(common.get("iterations_to_skip", ()))
            if loaded.optimizer:
                opt.step_count = common["optimizer_step"]
                opt.skipped_steps = common["skipped_steps"]
            else:
                opt.main_params.copy_(t.buffers.params[opt.start : opt.end])
                opt.exp_avg.zero_()
                opt.exp_avg_sq.zero_()
                opt.step_count = opt.skipped_steps = 0
        notes = []
        if loaded.resume:
            notes += self._check_schedule(common.get("args", {}).get("lr", {}))
        changes = [c for c in (changed_settings(common.get("args", {}), self._job_dict) if "args" in common else [])
                   if not (loaded.resume and c.startswith("lr."))]  # a resume's schedule is checked above
        if changes:
            listed = "; ".join(changes[:MAX_LISTED_CHANGES])
            more = f"; and {len(changes) - MAX_LISTED_CHANGES} more" if len(changes) > MAX_LISTED_CHANGES else ""
            notes.append(f"checkpoint: settings that differ from the saved run's (this run's apply): {listed}{more}")
        if not loaded.optimizer:
            notes.append("checkpoint: optimizer state not loaded: Adam's moments and step count start from zero, "
                         "the main weights from the loaded weights")
        if loaded.rng:
            note = self._restore_rng(small_state.get(keys.rng_key(self.rank)))
            if note is not None:
                notes.append(note)
        return notes

    def _check_schedule(self, saved: dict) -> list[str]:
        """A resumed run's LR schedule against the checkpoint's, as Megatron-LM checks it: refused
        where it differs, unless ``--override-opt_param-scheduler`` (this run's) or
        ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's; also a live rollback's, which
        goes back to a version with the schedule it had) says which wins. Returns notes."""
        from cli.flags import flag_name
        from trainer.lr_schedule import LRScheduleConfig, schedule_differences

        t = self.trainer
        differ = schedule_differences(saved, t.job.lr)
        if not differ:
            return []
        listed = "; ".join(f"{flag_name(LRScheduleConfig, name)}: {was} saved, {now} now"
                           for name, (was, now) in differ.items())
        if t.job.lr.use_checkpoint_scheduler or self.schedule_from_checkpoint:
            t.job = dataclasses.replace(t.job, lr=dataclasses.replace(t.job.lr, **{n: v[0] for n, v in differ.items()}))
            self.job_changed()
            return [] if self.schedule_from_checkpoint else [f"checkpoint: the LR schedule is the checkpoint's ({listed})"]
        if t.job.lr.override_scheduler:
            return [f"checkpoint: the LR schedule is this run's (--override-opt_param-scheduler: {listed})"]
        raise CheckpointMismatchError(
            f"the LR schedule differs from the checkpoint's ({listed}): give the saved values, or "
            "--override-opt_param-scheduler (this run's win) or --use-checkpoint-opt_param-scheduler (the "
            "checkpoint's win). --lr-decay-iters defaults to --train-iters: give it to train longer with the same "
            "schedule")

    def _check_same_model(self, common: dict) -> None:
        saved = common.get("args", {}).get("model", {}).get("vocab_size")
        if saved is not None and saved != self.vocab_size:
            raise CheckpointMismatchError(
                f"the checkpoint's vocabulary has {saved} entries, this model's {self.vocab_size}: its embedding "
                "rows are other tokens. Use the checkpoint's --vocab-size (or tokenizer)")

    def _restore_rng(self, rng: dict | None) -> str | None:
        """Restore the RNG states; returns a note for the user when they were not restored.

        RNG states are device-specific: the device generator's state and megatron's tensor-parallel
        tracker hold CUDA generator states on a GPU and CPU generator states on the CPU (feeding one
        into the other fails with "RNG state is wrong size"). Across devices only the
        device-independent generators (python, numpy, torch's CPU generator) are restored; weights
        and optimizer state are restored exactly either way.
        """
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        if rng is None:
            return None
        t = self.trainer
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        here = t.device_ctx.device.type
        # Checkpoints written before the device was recorded: a CPU run stored no device state.
        saved = rng.get("device_type", "cpu" if rng["device"] is None else "cuda")
        if saved != here:
            return (f"checkpoint: written on {saved}, this run is on {here}: the {saved} RNG states (device generator, "
                    "tensor-parallel tracker) were not restored, so dropout draws differ from the original run; "
                    "weights and optimizer state are restored exactly")
        t.device_ctx.set_rng_state(rng["device"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
        return None
