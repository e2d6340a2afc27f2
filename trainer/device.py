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

    def peak_memory_mib(self) -> float | None:
        """The most memory torch's allocator has held for tensors on this device since the process
        started, in MiB (``torch.cuda.max_memory_allocated``); None on CPU, whose peak is the
        process's resident memory (``trainer.metrics_file.peak_resident_mib``)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.is_cuda else None

    def get_rng_state(self) -> torch.Tensor | None:
        """The device generator's state (None on CPU, whose generator is torch's default)."""
        return torch.cuda.get_rng_state(self.device) if self.is_cuda else None

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if self.is_cuda and state is not None:
            torch.cuda.set_rng_state(state, self.device)


class DeviceError(RuntimeError):
    """The processes cannot be placed on this machine's devices; the message says what to do."""


FORCE_CPU_VARIABLE = "GPT_FORCE_CPU"


def cuda_selected(force_cpu: bool = False, environ=os.environ) -> bool:
    """Whether this run computes on CUDA: a GPU is present and the CPU path is not forced
    (``force_cpu`` or ``GPT_FORCE_CPU=1``). No side effects: argument checks ask it before any
    device is touched, and :func:`select_device` decides with it."""
    forced = force_cpu or environ.get(FORCE_CPU_VARIABLE, "0") == "1"
    return not forced and torch.cuda.is_available()


def select_device(local_rank: int | None = None, force_cpu: bool = False, environ=os.environ) -> DeviceContext:
    """CUDA with NCCL when a GPU is present (one per local rank), else CPU with gloo.

    ``force_cpu`` (or ``GPT_FORCE_CPU=1``) keeps a GPU machine on the CPU path. More processes on
    a node than GPUs is refused here, before any process group exists: two ranks on one GPU make
    NCCL fail ("Duplicate GPU detected") or hang.
    """
    if local_rank is None:
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    if not cuda_selected(force_cpu, environ):
        return DeviceContext(device=torch.device("cpu"), backend="gloo")
    gpus = torch.cuda.device_count()
    local_world = int(environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    if local_world > gpus or local_rank >= gpus:
        raise DeviceError(
            f"{local_world} processes on this node but {gpus} GPU(s) visible (local rank {local_rank}): "
            f"each rank needs a GPU of its own. Start at most {gpus} per node (torchrun "
            f"--nproc-per-node {gpus}), make more GPUs visible (CUDA_VISIBLE_DEVICES), or run on "
            f"the CPU with {FORCE_CPU_VARIABLE}=1."
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return DeviceContext(device=device, backend="nccl")
