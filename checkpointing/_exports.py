"""Lazy public names of a subpackage (PEP 562): ``from checkpointing.storage import HostPool``
imports ``checkpointing.storage.host_pool`` only then. A subpackage's ``__init__`` stays free of
imports, so a light path (``scripts/rollback.sh --live`` imports no torch) never pays for a
neighbour it does not use, and the import order inside the package is the modules' own."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], modules: tuple[str, ...] = ()
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose public ``name`` lives
    in its module ``exports[name]``, and whose ``modules`` are public whole."""

    def __getattr__(name: str) -> object:
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r} (its public names: __all__)")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    names = sorted([*exports, *modules])

    def __dir__() -> list[str]:
        return names

    return names, __getattr__, __dir__
