"""What every trainer worker does first: parse the pretrain arguments, pick the device, join the
job's process groups and build this rank's trainer (as ``trainer.training.pretrain`` does)."""

from __future__ import annotations

from models.cpu_compat import apply_cpu_compat
from trainer.arguments import parse_job_config
from trainer.device import select_device
from trainer.training import Trainer, init_distributed


def start_trainer(argv: list[str]):
    """(job, trainer) for this rank, under ``torchrun`` (or one plain process)."""
    job = parse_job_config(argv)
    device = select_device()
    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = job.parallel.initialize()
    return job, Trainer(job, device, groups)
