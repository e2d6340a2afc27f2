"""Reading pickles that someone else may have written, without running their code.

Unpickling calls whatever global the pickle names: a checkpoint file is code. Everything this
project reads back goes through one of two restricted loaders:

- tensors and the small state (iteration, arguments, RNG states): ``torch.load(weights_only=True)``,
  which admits tensors, builtin containers and scalars, plus numpy's array reconstruction (numpy's
  RNG state is a uint32 array; torch's documentation names these globals as safe to allow);
- DCP's ``.metadata``: a stock pickle (stock readers need it), read by an unpickler that admits
  only ``torch.distributed.checkpoint``'s metadata classes (and its save-plan dataclasses, which
  megatron-core's metadata holds), ``torch.Size``, torch dtypes and the layout helper, and names
  anything else it meets.

A file that needs more is refused with :class:`CheckpointUntrustedError`, unless the caller
passes ``trust=True`` (``--trust-checkpoint-pickles``: the user vouches for the checkpoint).

``.metadata`` can also be read *inert* (``load_dcp_metadata(..., inert=True)``): the same globals
are admitted, but each stands for a plain record of its fields (:class:`InertRecord`), a
``torch.Size`` for a tuple, a dtype for its name. Nothing from torch is imported, which is most of a
command line tool's start (``rollback.sh --list`` and a rollback took ~3 s, 2 of them importing
torch). A name the inert reader has no stand-in for is read the strict way instead.
"""

from __future__ import annotations

import enum
import io
import pickle
from typing import Any, BinaryIO

from checkpointing.base.errors import CheckpointCorruptError, CheckpointUntrustedError

TRUST_HINT = ("If you wrote this checkpoint yourself and no one else can write its directory, pass "
              "--trust-checkpoint-pickles")


def numpy_globals() -> list[Any]:
    """What numpy's RNG state (``np.random.get_state()``, a uint32 array) pickles with."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_objects(blob: bytes, where: str, trust: bool = False, allowed: tuple[Any, ...] = ()) -> tuple[Any, bool]:
    """Unpickle a ``torch.save`` blob (a tensor chunk or a small object) safely.

    Returns (value, whether full unpickling was needed); raises :class:`CheckpointUntrustedError`
    if it is needed and ``trust`` is False, :class:`CheckpointCorruptError` if the bytes are damaged.
    ``allowed``: more globals the caller's format puts there (Megatron-LM's ``argparse.Namespace``).
    """
    import torch

    try:
        with torch.serialization.safe_globals([*numpy_globals(), *allowed]):
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointCorruptError(f"cannot decode {where}: {error}") from error
        if not trust:
            reason = str(error).split("\n")
            named = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
            raise CheckpointUntrustedError(
                f"{where} needs full unpickling, which would run code from the file ({named[:200]}); refused. "
                f"{TRUST_HINT}") from None
    except Exception as error:  # torch.load raises many types on damaged bytes
        raise CheckpointCorruptError(f"cannot decode {where}: {error}") from error
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False), True
    except Exception as error:  # as above: damaged bytes
        raise CheckpointCorruptError(f"cannot decode {where}: {error}") from error


_DCP_PLAN_CLASSES = frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"})
"""DCP's save-plan dataclasses: megatron-core keeps the plans of a save in its ``.metadata``
(to reuse them), so a Megatron-LM checkpoint's metadata names them."""


def _allowed_dcp_global(module: str, name: str) -> bool:
    if module == "torch.distributed.checkpoint.planner":
        return name in _DCP_PLAN_CLASSES
    if module == "torch.distributed.checkpoint.metadata":
        import torch.distributed.checkpoint.metadata as dcp_metadata

        return isinstance(getattr(dcp_metadata, name, None), type)  # its dataclasses and enums
    if (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                          ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}:
        return True
    if module != "torch":
        return False
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def check_pickle_bounds(data: bytes, where: str) -> None:
    """Refuse a pickle whose opcodes could make the unpickler allocate beyond its own size: a
    memo index past the opcodes that could have filled it (one flipped bit of ``BINPUT`` into
    ``LONG_BINPUT`` asks for gigabytes), a length past the end of the data, an unknown opcode.
    For pickles no checksum vouches for; raises :class:`CheckpointCorruptError`."""
    import pickletools

    try:
        for count, (opcode, argument, _position) in enumerate(pickletools.genops(data)):
            if opcode.name in _MEMO_OPCODES and (not isinstance(argument, int) or not 0 <= argument <= count):
                raise CheckpointCorruptError(f"{where}: memo index {argument} at opcode {count}; the file is damaged")
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # what genops raises on bytes that are no pickle
        raise CheckpointCorruptError(f"{where} is not a well-formed pickle ({error}); the file is damaged") from error


def _not_an_enum_member(owner: Any, name: Any) -> CheckpointUntrustedError:
    """The refusal of a ``getattr`` in a pickle that is not one of an admitted enum's members."""
    return CheckpointUntrustedError(f"it calls getattr({owner!r:.80}, {name!r:.80}), which is not an enum member "
                                    "of DCP's metadata")


def _enum_member(owner: Any, name: Any) -> Any:
    """``getattr`` as Python 3.11.0-3.11.4 pickle enum members with it (Debian 12 ships 3.11.2):
    a member of an enum class this unpickler admits, by its name, and nothing else."""
    if (isinstance(owner, type) and issubclass(owner, enum.Enum) and isinstance(name, str)
            and name in owner.__members__ and _allowed_dcp_global(owner.__module__, owner.__qualname__)):
        return owner.__members__[name]
    raise _not_an_enum_member(owner, name)


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # a protocol-2 pickle's name for builtins, which pickle's own find_class maps
            module = "builtins"     # (``checkpointing.format.metadata_encoding`` writes protocol 2)
        if _allowed_dcp_global(module, name):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        raise CheckpointUntrustedError(f"it names {module}.{name}, which is not part of DCP's metadata")


class InertRecord:
    """An object of one of DCP's metadata classes, rebuilt without the class: pickle makes it
    (``NEWOBJ``, or a call with ``args``, as an enum member is made) and sets its fields (``BUILD``),
    and nothing of the class runs. Fields read as attributes; a field the pickle leaves out (its
    class's default then applies) is absent; a state that is not a dict (a class with its own
    ``__setstate__``) is kept as ``state``. Compares and hashes by class name and
    contents, as the frozen dataclasses it stands for do (a ``MetadataIndex`` is a dict key)."""

    def __init__(self, *args: Any):
        self.args = args
        """What it was made from: an enum member's value (or its name, as Python 3.11.0-3.11.4
        pickled members)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def _identity(self) -> tuple:
        return type(self).__name__, tuple(sorted(self.__dict__.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InertRecord) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k != "args" or v)
        return f"{type(self).__name__}({fields})"


_INERT_CLASSES = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
}
"""The classes our ``.metadata`` names, each read inert as an :class:`InertRecord` of its name
(every one is also admitted by :func:`_allowed_dcp_global`; a test holds the two together)."""

INERT_ENUM_MEMBERS = {("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): frozenset({
    "TORCH_CONTIGUOUS_FORMAT", "TORCH_CHANNELS_LAST", "TORCH_PRESERVE_FORMAT"})}
"""The members of the enums above, by name: Python 3.11.0-3.11.4 (Debian 12's python3.11) pickle
a member as ``getattr(enum, name)``, and the inert reader admits exactly the members the strict
one does."""

INERT_DTYPES = frozenset({
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2"})
"""Dtypes read inert as their name (``"torch.float32"``, as ``str(torch.float32)``); the rarer ones
send the file to the strict reader."""


class _NoStandIn(Exception):
    """The inert reader met a global it has no stand-in for."""


def _layout_name(name: str) -> str:
    return name  # torch.serialization._get_layout("torch.strided") -> the layout's name


def _inert_enum_member(owner: Any, name: Any) -> InertRecord:
    """:func:`_enum_member` for the inert reader: a member of an enum it stands in for, by name."""
    if (isinstance(owner, type) and issubclass(owner, InertRecord)
            and name in INERT_ENUM_MEMBERS.get((owner.__module__, owner.__qualname__), ())):
        return owner(name)
    raise _not_an_enum_member(owner, name)


class _InertDcpMetadataUnpickler(pickle.Unpickler):
    """:class:`_DcpMetadataUnpickler`'s rules, with stand-ins in place of torch's objects."""

    _made: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if module == "__builtin__":
            module = "builtins"
        if name in _INERT_CLASSES.get(module, ()):
            key = (module, name)
            if key not in self._made:
                self._made[key] = type(name, (InertRecord,), {"__module__": module, "__qualname__": name})
            return self._made[key]
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and name in INERT_DTYPES:
            return f"torch.{name}"
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout_name
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _inert_enum_member
        raise _NoStandIn(f"{module}.{name}")


def load_dcp_metadata(file: BinaryIO, where: str, trust: bool = False, inert: bool = False) -> tuple[Any, bool]:
    """DCP's ``.metadata`` from ``file``; returns (metadata, whether full unpickling was needed).
    ``inert``: made of :class:`InertRecord` stand-ins where that can be done without torch (for
    tools that read only its fields: places, sizes, our facts). Raises
    :class:`CheckpointUntrustedError` (refused, nothing run) or ``pickle`` errors on damaged bytes."""
    data = file.read()
    for unpickler in ((_InertDcpMetadataUnpickler,) if inert else ()) + (_DcpMetadataUnpickler,):
        try:
            return unpickler(io.BytesIO(data)).load(), False
        except _NoStandIn:
            continue  # a class or dtype with no stand-in: the strict reader decides
        except CheckpointUntrustedError as refused:
            if not trust:
                raise CheckpointUntrustedError(f"{where} refused: {refused}; nothing in it was run. {TRUST_HINT}") from None
            break
    return pickle.loads(data), True
