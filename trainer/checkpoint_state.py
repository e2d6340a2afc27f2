"""The trainer's state as the checkpoint layer sees it (``checkpointing.items``).

Saved, per optimizer piece (a row-rectangle of one parameter in one optimizer shard):
``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<param>`` and the model weight ``<param>``.
With fp32 weights the model weight record points at the main weights' bytes (the same values:
the step copies them over), so it costs no extra bytes; with bf16 the cast weights are saved.

Loaded: every local parameter (all replicas, the tied copy included) as a rectangle of its
global tensor, and this rank's optimizer pieces; any layout that saved them will do.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch

from checkpointing.items import TensorPiece
from trainer.state_layout import optimizer_state_pieces

OPTIMIZER_ARRAYS = ("fp32_param", "exp_avg", "exp_avg_sq")


def _rng_key(rank: int) -> str:
    return f"rng_state.rank_{rank}"


class TrainerCheckpointState:
    """Implements :class:`checkpointing.items.CheckpointableState` for a :class:`Trainer`."""

    def __init__(self, trainer, load_optimizer: bool = True, load_rng: bool = True):
        self.trainer = trainer
        opt, buffers = trainer.optimizer, trainer.buffers
        self.rank = trainer.groups.rank
        self.load_rng = load_rng
        self.bf16 = buffers.params.dtype != torch.float32
        self.arrays: dict[str, torch.Tensor] = {
            "fp32_param": opt.main_params, "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}
        if self.bf16:
            self.arrays["param"] = buffers.params[opt.start : opt.end]
        self.shards = [(s.start - opt.start, s.end - opt.start) for s in opt.shards]
        pieces = optimizer_state_pieces(opt, trainer.param_specs, trainer.groups.dp_rank)
        self.save_pieces: list[TensorPiece] = []
        self.load_pieces: list[TensorPiece] = []
        for p in pieces:
            common = dict(start=p.start - opt.start, shape=p.shape, global_shape=p.global_shape,
                          global_offset=p.global_offset, is_writer=p.is_writer)
            for array in OPTIMIZER_ARRAYS:
                piece = TensorPiece(key=f"optimizer.state.{array}.{p.global_name}", array=array, **common)
                self.save_pieces.append(piece)
                if load_optimizer:
                    self.load_pieces.append(piece)
            self.save_pieces.append(TensorPiece(key=p.global_name, array="param" if self.bf16 else "fp32_param", **common))
        self.load_arrays: dict[str, torch.Tensor] = dict(self.arrays, param=buffers.params)
        for slot in buffers.slots:
            spec = trainer.param_specs[slot.name]
            self.load_pieces.append(TensorPiece(key=spec.global_name, array="param", start=slot.start, shape=slot.shape,
                                                global_shape=spec.global_shape, global_offset=spec.global_offset))
        self.load_optimizer = load_optimizer
        self._job_dict = dataclasses.asdict(trainer.job)  # frozen: converted once, not at every request
        self.layout = {
            "tensor_parallel": trainer.job.parallel.tensor_parallel,
            "pipeline_parallel": trainer.job.parallel.pipeline_parallel,
            "data_parallel": trainer.job.parallel.data_parallel,
            "distributed_optimizer": opt.distributed,
            "num_layers": trainer.job.model.num_layers,
            "bf16": self.bf16,
        }

    def restore_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        """Restore from a same-layout snapshot of ``arrays`` (the host pool, L0); collective over DP."""
        for name, live in self.arrays.items():
            live.copy_(arrays[name])
        self.trainer.optimizer.publish_main_params()

    # -- small objects ---------------------------------------------------------------------------
    def capture_objects(self, iteration: int) -> dict[str, Any]:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        t = self.trainer
        objects: dict[str, Any] = {
            _rng_key(self.rank): {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "device": t.device_ctx.get_rng_state(),
                "device_type": t.device_ctx.device.type,
                "tracker": get_cuda_rng_tracker().get_states(),
            }
        }
        if self.rank == 0:
            objects["common"] = {
                "iteration": iteration,
                "consumed_samples": iteration * t.job.data.global_batch_size,
                "optimizer_step": t.optimizer.step_count,
                "skipped_steps": t.optimizer.skipped_steps,
                "layout": self.layout,
                "device": t.device_ctx.device.type,
                "args": self._job_dict,
            }
        return objects

    def objects_to_load(self) -> list[str]:
        return ["common"] + ([_rng_key(self.rank)] if self.load_rng else [])

    def restore_objects(self, objects: dict[str, Any]) -> str | None:
        """Restore the small state; returns a note for the user when RNG states were not restored.

        RNG states are device-specific: the device generator's state and megatron's tensor-parallel
        tracker hold CUDA generator states on a GPU and CPU generator states on the CPU (feeding one
        into the other fails with "RNG state is wrong size"). Across devices only the
        device-independent generators (python, numpy, torch's CPU generator) are restored; weights
        and optimizer state are restored exactly either way.
        """
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        t, common = self.trainer, objects["common"]
        t.iteration = common["iteration"]
        if self.load_optimizer:
            t.optimizer.step_count = common["optimizer_step"]
            t.optimizer.skipped_steps = common["skipped_steps"]
        rng = objects.get(_rng_key(self.rank))
        if rng is None:
            return None
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
