"""Make megatron-core's model code run on a machine without CUDA.

megatron-core 0.16 assumes a GPU in a few places that the model's forward and backward pass
through even on the local (non-TransformerEngine) layer spec. This module patches exactly those
places, and only when the device chosen for the run (``trainer/device.py``, the one place it is
chosen) is the CPU: for a CUDA run :func:`apply_cpu_compat` does nothing. A machine with GPUs that
runs on the CPU on purpose (``GPT_FORCE_CPU=1``, e.g. ``scripts/run_demo.sh`` with fewer than 8
GPUs) is patched like a machine without any.
Each patch is small, named, and tested in ``tests/test_cpu_compat.py``.

Patches (each found by running megatron-core's model code on a machine without CUDA):

1. ``torch.cuda.current_device`` returns the CPU device. megatron-core allocates buffers with
   ``device=torch.cuda.current_device()`` (global memory buffer, attention masks, TP layers).
2. The tensor-parallel RNG tracker (``CudaRNGStatesTracker``) keeps CPU generator states instead
   of CUDA generator states, so ``model_parallel_cuda_manual_seed`` and dropout inside
   ``tracker.fork()`` work and stay reproducible.
3. ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied output weight of the last
   pipeline stage with ``.cuda()``; on CPU that move is skipped.
4. Activation recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA
   generator's state beside the CPU one; on CPU there is none (dropout draws from the CPU
   generator, which it saves already), so the CUDA state is nothing and restoring it does nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


class CpuRNGStatesTracker:
    """Drop-in replacement for megatron-core's ``CudaRNGStatesTracker`` on CPU.

    Named states are CPU generator states (``torch.get_rng_state``); ``fork(name)`` swaps the
    named state into the CPU generator for the duration of the block and stores its advance.
    """

    def __init__(self, *args, **kwargs):  # accepts the CUDA tracker's keyword arguments
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker seed {seed} is already used")
        if name in self.states_:
            raise ValueError(f"RNG tracker state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG tracker state {name!r} was never added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _skip_cuda_move(method):
    """Run ``method`` with ``Tensor.cuda`` returning the tensor itself (CPU only)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__cpu_compat__ = True
    return wrapper


def _no_cuda_rng_state(*args, **kwargs) -> None:
    return None


def _set_no_cuda_rng_state(state, *args, **kwargs) -> None:
    if state is not None:
        raise RuntimeError("a CUDA generator state reached the CPU run's recomputation; expected none")


def apply_cpu_compat(device: torch.device) -> bool:
    """Apply the patches when the run's ``device`` is the CPU. Idempotent. Returns True if patched.

    The device is the run's choice, not ``torch.cuda.is_available()``: on a GPU machine forced
    to the CPU, megatron-core would otherwise allocate on the GPU while the model is on the CPU.
    """
    global _APPLIED
    if device.type != "cpu":
        return False
    if _APPLIED:
        return True
    from megatron.core.models.common.language_module import language_module
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = _cpu_current_device
    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tp_random.initialize_rng_tracker(force_reset=True)
    tp_random._get_cuda_rng_state = _no_cuda_rng_state
    tp_random._set_cuda_rng_state = _set_no_cuda_rng_state
    cls = language_module.LanguageModule
    cls.setup_embeddings_and_output_layer = _skip_cuda_move(cls.setup_embeddings_and_output_layer)
    _APPLIED = True
    return True
