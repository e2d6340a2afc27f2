"""The one place where the compute device and the collective backend are chosen.

Everything else asks a :class:`DeviceContext` instead of writing ``"cuda"`` or ``"gloo"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceContext:
    """Where tensors live and how processes talk."""

    device: torch.device
    """Device of the model, activations and gradients."""
    backend: str
    """``torch.distributed`` backend: ``nccl`` on CUDA, ``gloo`` on CPU."""

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU); used around timers."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def get_rng_state(self) -> torch.Tensor | None:
        """The device generator's state (None on CPU, whose generator is torch's default)."""
        return torch.cuda.get_rng_state(self.device) if self.is_cuda else None

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if self.is_cuda and state is not None:
            torch.cuda.set_rng_state(state, self.device)


def select_device(local_rank: int | None = None, force_cpu: bool = False) -> DeviceContext:
    """CUDA with NCCL when a GPU is present (one per local rank), else CPU with gloo.

    ``force_cpu`` (or ``GPT_FORCE_CPU=1``) keeps a GPU machine on the CPU path, for tests.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    force_cpu = force_cpu or os.environ.get("GPT_FORCE_CPU", "0") == "1"
    if torch.cuda.is_available() and not force_cpu:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return DeviceContext(device=device, backend="nccl")
    return DeviceContext(device=torch.device("cpu"), backend="gloo")
