"""The CPU bench's model and its checkpointed state: a GPT whose fp32 main weights and both Adam
moments are about 1 GB, built in this process as the trainer builds it."""

from __future__ import annotations

import os

MODEL = ("--num-layers 6 --hidden-size 1024 --num-attention-heads 16 --seq-length 128 --max-position-embeddings 128 "
         "--vocab-size 8192 --mock-data --micro-batch-size 1 --global-batch-size 2 --train-iters 100000 --lr 1e-4 "
         "--hidden-dropout 0 --attention-dropout 0 --optimizer-shard-size-mb 64").split()


def build_trainer():
    """A 1-process job's :class:`trainer.training.Trainer` of :data:`MODEL`, every core for torch."""
    import torch

    from models.cpu_compat import apply_cpu_compat
    from trainer.arguments import parse_job_config
    from trainer.device import select_device
    from trainer.training import Trainer, init_distributed

    torch.set_num_threads(os.cpu_count() or 1)
    job = parse_job_config(MODEL, world_size=1)
    device = select_device()
    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = job.parallel.initialize()
    return Trainer(job, device, groups)


def flat_state(trainer) -> dict:
    """The optimizer's fp32 arrays a checkpoint holds: main weights and both Adam moments."""
    opt = trainer.optimizer
    return {"fp32_param": opt.main_params, "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}


def state_bytes(trainer) -> int:
    return sum(t.numel() * 4 for t in flat_state(trainer).values())
