"""Which of megatron-core's fused kernels the model may use, decided where the model is built.

megatron-core turns a fusion on by a ``TransformerConfig`` flag and then calls the kernel at the
first forward, with no fallback: on a machine without Apex's compiled softmax kernels,
``masked_softmax_fusion`` fails with ``ModuleNotFoundError: scaled_masked_softmax_cuda`` in the
first bf16 forward; the bias-dropout-add fusion goes through ``torch.compile`` (megatron's
``jit_fuser``), which needs a working Inductor/Triton for the device. So each fusion is asked for
by the user (:class:`KernelFusions`, Megatron-LM's flags) and granted by
:func:`resolve_fusions` only where its kernel works on the chosen device; what was refused is
said once, with the reason.

The bias-GELU fusion is different: megatron-core's fused kernel computes the tanh approximation
of GELU, the unfused MLP the exact GELU. Turning it on changes the model's function (a checkpoint
trained with it gives other outputs without it, and a CPU run is not comparable to a GPU run), so
it is off unless asked for (``--bias-gelu-fusion``).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field

import torch

from cli.flags import flag


@dataclass(frozen=True)
class KernelFusions:
    """Fusions the user asks for; :func:`resolve_fusions` grants those whose kernel works."""

    bias_gelu: bool = flag("--bias-gelu-fusion", False, off="--no-bias-gelu-fusion")
    """Fused bias + GELU in the MLP. Megatron's kernel is the *tanh approximation* of GELU, so this
    changes the model's function: off by default, unlike Megatron-LM."""
    bias_dropout: bool = flag("--no-bias-dropout-fusion", True)
    """Fused bias + dropout + residual add, where ``torch.compile`` works on the device
    (``--no-bias-dropout-fusion`` turns it off). The same function as unfused."""
    masked_softmax: bool = flag("--no-masked-softmax-fusion", True)
    """Apex's fused scale-mask-softmax kernels in megatron's local attention, where
    ``scaled_masked_softmax_cuda`` imports (``--no-masked-softmax-fusion`` turns them off).
    The same function as unfused; the SDPA attention backend does not use it."""


@dataclass(frozen=True)
class ResolvedFusions:
    """The ``TransformerConfig`` flags to build the model with, and why any request was refused."""

    bias_activation_fusion: bool
    bias_dropout_fusion: bool
    masked_softmax_fusion: bool
    refused: tuple[str, ...] = field(default=())

    def transformer_config_kwargs(self) -> dict[str, bool]:
        return {
            "bias_activation_fusion": self.bias_activation_fusion,
            "bias_dropout_fusion": self.bias_dropout_fusion,
            "masked_softmax_fusion": self.masked_softmax_fusion,
        }


# The compiled softmax kernels megatron-core's FusedScaleMaskSoftmax imports (Apex / Megatron-LM's
# fused_kernels); all must import for the fusion to be safe in every mask mode.
SOFTMAX_KERNEL_MODULES = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")


def softmax_kernels_status() -> str | None:
    """None when Apex's fused softmax kernels import, else why not."""
    for name in SOFTMAX_KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as error:
            return f"{name} does not import ({error}; it comes with Apex's or Megatron-LM's fused kernels)"
    return None


@functools.lru_cache(maxsize=None)
def torch_compile_status(device_type: str) -> str | None:
    """None when ``torch.compile`` compiles and runs a small function on ``device_type``, else
    why not. Probed once per process: the fusions' own compile happens later, at the first
    forward, where a failure could not be recovered."""
    try:
        compiled = torch.compile(lambda x, y: torch.nn.functional.dropout(x + y, 0.0, True) + y, dynamic=False)
        x = torch.ones(8, device=device_type)
        if not torch.equal(compiled(x, x), torch.full_like(x, 3.0)):
            return "torch.compile gave a wrong result on a probe"
    except Exception as error:  # noqa: BLE001 -- any failure means: do not depend on the compiler
        return f"torch.compile does not work here ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


def resolve_fusions(wanted: KernelFusions, device: torch.device) -> ResolvedFusions:
    """The fusions to build the model with on ``device``.

    On CPU none: megatron-core's fused paths are CUDA kernels or CUDA-tuned compiled code, and the
    unfused path is the reference the tests compare against.
    """
    refused: list[str] = []
    if device.type != "cuda":
        for name, asked in (("bias-gelu", wanted.bias_gelu),):
            if asked:
                refused.append(f"{name} fusion: only on CUDA (device is {device.type})")
        return ResolvedFusions(False, False, False, tuple(refused))
    compile_reason = None
    if wanted.bias_gelu or wanted.bias_dropout:
        compile_reason = torch_compile_status(device.type)
    bias_gelu = wanted.bias_gelu and compile_reason is None
    bias_dropout = wanted.bias_dropout and compile_reason is None
    for name, asked, granted in (("bias-gelu", wanted.bias_gelu, bias_gelu), ("bias-dropout", wanted.bias_dropout, bias_dropout)):
        if asked and not granted:
            refused.append(f"{name} fusion off: {compile_reason}")
    masked_softmax = False
    if wanted.masked_softmax:
        reason = softmax_kernels_status()
        masked_softmax = reason is None
        if reason is not None:
            refused.append(f"masked-softmax fusion off: {reason}")
    return ResolvedFusions(bias_gelu, bias_dropout, masked_softmax, tuple(refused))
