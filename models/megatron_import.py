"""Import megatron-core without paying for TorchInductor at start-up.

megatron-core decorates its fused kernels (bias-GeLU, bias-SwiGLU, ...) with ``torch.compile``
as it imports them (``megatron.core.jit.jit_fuser``). Decorating alone imports TorchDynamo and
Inductor: seconds of every rank's start-up (measured here: about half of megatron-core's import),
though a run calls those kernels only with fusions on, and the CPU path turns them off.

:func:`import_megatron_core` imports megatron-core with ``torch.compile`` standing in for a
deferred decorator: the function is compiled, by the real ``torch.compile`` with the same
options, the first time it is called. What runs is the same; only when Inductor loads moves.
"""

from __future__ import annotations

import functools
import sys
import threading

import torch


class DeferredCompile:
    """``torch.compile(fn, **options)``, made on the first call."""

    def __init__(self, fn, compile_fn, options: dict):
        functools.update_wrapper(self, fn)
        self._fn, self._compile, self._options = fn, compile_fn, options
        self._compiled = None
        self._lock = threading.Lock()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            with self._lock:
                if self._compiled is None:
                    self._compiled = self._compile(self._fn, **self._options)
        return self._compiled(*args, **kwargs)


def deferred_compile(compile_fn):
    """A stand-in for ``compile_fn`` (``torch.compile``) that defers each compilation to the first call."""

    def compile_later(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: DeferredCompile(fn, compile_fn, options)
        return DeferredCompile(model, compile_fn, options)

    return compile_later


def import_megatron_core() -> None:
    """Import ``megatron.core`` (once) with its import-time ``torch.compile`` deferred."""
    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    torch.compile = deferred_compile(real)
    try:
        import megatron.core  # noqa: F401 - megatron.core.jit keeps the stand-in as its jit_fuser
    finally:
        torch.compile = real
