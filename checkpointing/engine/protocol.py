"""The messages between a rank's engine (the training process) and its flusher process.

One engine talks to one flusher over a private socket pair, each message a frozen dataclass of
this module, pickled by :func:`send` and checked by :func:`receive`: a message of another type,
or a field of the wrong type, is refused with a :class:`ProtocolError` naming it (the two ends
are the same code, so this is a bug or a damaged stream, never a version to guess at).

The call order:

1. The engine starts the flusher (forked from the template, or a fresh interpreter) and sends
   one :class:`FlusherSpec`: the pool's files, the pieces, the levels, the layout.
2. The flusher joins its flushers' process group and answers :class:`Ready`.
3. For each requested version, once its bytes are in its slot, the engine sends
   :class:`Describe` (the L0 commit: the slot's description) and then one :class:`FlushJob` per
   level due. The flusher answers :class:`Described` at once, from its receiving thread, and
   :class:`Done` for each job when its flush ends (``result`` None: skipped, a newer version
   superseded it on every rank).
4. At the end the engine sends :class:`Stop` (finish the queue, then answer :class:`Stopped`
   and exit) or, after an error, :class:`Abort` (exit now; queued flushes are dropped).
5. :class:`Fatal` may come at any time: the flusher failed, with its traceback; the engine
   raises :class:`~checkpointing.base.errors.FlusherError`.

Besides the messages, the two share the control block (``checkpointing.engine.control_block``):
the shards a flush has read, which the training thread's fences wait on, and a heartbeat.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import types
import typing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from checkpointing.base.errors import FlusherError
from checkpointing.base.levels import Level
from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.format.items import TensorPiece
from checkpointing.storage.host_pool import ArraySpec
from checkpointing.storage.peer_replicas import ReplicaSpec


class ProtocolError(FlusherError):
    """A message between engine and flusher of an unknown type or with a field of a wrong type."""


def _matches(value: Any, expected: Any) -> bool:
    """``isinstance`` for the annotations this module uses (unions, parametrised containers by
    their origin, ``Any``); a bool is not an int here."""
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if origin is not None:
        return isinstance(value, origin)
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if expected in (int, float) and isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Checked:
    """Checks each field's type at construction, on both ends of the socket."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _matches(value, hints[field.name]):
                raise ProtocolError(f"{type(self).__name__}.{field.name} = {value!r:.80}: expected "
                                    f"{hints[field.name]}")


# -- engine -> flusher -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FlusherSpec(_Checked):
    """What a flusher needs to know, sent once, first."""

    rank: int
    world_size: int
    store: tuple | None
    """The job's TCP store (host, port) the flushers' group meets at; None: a one-rank job."""
    store_prefix: str
    """Keys of this engine's flusher group in that store (unique per engine of the job)."""
    group_timeout_seconds: float
    control_path: str
    """The control block shared with the engine (fences, heartbeat, CPU clock)."""
    slot_paths: tuple
    """The L0 pool's slot files, by slot index."""
    meta_paths: tuple
    """Each slot's description file."""
    specs: dict
    """``{array name: ArraySpec}`` of a slot."""
    shards: tuple
    """``(start, end)`` element ranges of the fenced shards, in the order the flusher reads them."""
    pieces: tuple
    """The state's :class:`~checkpointing.format.items.TensorPiece` list, as saved."""
    levels: tuple
    """The :class:`~checkpointing.base.levels.Level` list the jobs name (by ``Level.name``)."""
    layout: ParallelLayout
    trace: bool
    """Send the flush spans back with each :class:`Done` (``--trace-dir``)."""
    replicas: ReplicaSpec | None = None
    """Peer replicas (``--ckpt-peer-replicas``): whom this rank sends its versions to and whose it holds."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, items, kind in (("specs", self.specs.values(), ArraySpec), ("pieces", self.pieces, TensorPiece),
                                  ("levels", self.levels, Level)):
            wrong = next((item for item in items if not isinstance(item, kind)), None)
            if wrong is not None:
                raise ProtocolError(f"FlusherSpec.{name} holds {wrong!r:.80}: expected {kind.__name__}")

    def level(self, name: str) -> Level:
        """The level a job names."""
        for level in self.levels:
            if level.name == name:
                return level
        raise ProtocolError(f"a job names level {name!r}; this flusher has {[lv.name for lv in self.levels]}")


@dataclass(frozen=True)
class Describe(_Checked):
    """Write slot ``slot``'s description: it now holds ``version`` (the L0 commit)."""

    seq: int
    """The engine's request number (jobs of this version name it)."""
    slot: int
    version: int
    small_state: dict
    """The state's small objects (iteration, arguments, RNG states...), pickled with the description."""


@dataclass(frozen=True, kw_only=True)
class FlushJob(_Checked):
    """Write ``version`` from slot ``slot`` to the level named ``level``."""

    id: int
    level: str
    """:attr:`Level.name <checkpointing.base.levels.Level.name>` of a level in the spec."""
    version: int
    slot: int
    seq: int
    """The request whose :class:`Describe` carried this version's small state."""
    forced: bool
    """The end of training (or a forced flush): never superseded by a newer version."""


@dataclass(frozen=True)
class Stop(_Checked):
    """Finish every queued job, answer :class:`Stopped`, exit."""


@dataclass(frozen=True)
class Abort(_Checked):
    """Exit now (after an error): what was described stays, queued flushes are dropped."""


# -- flusher -> engine -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready(_Checked):
    """The flusher is up (its group joined) and takes messages."""

    start_seconds: float
    resident_bytes: int
    """Its unshared resident memory (``Private_*`` of ``smaps_rollup``)."""
    cpu_seconds: float
    """Its process CPU clock at this point (its start-up)."""


@dataclass(frozen=True)
class Described(_Checked):
    """The description of request ``seq`` is written (``error`` None) or failed (its message)."""

    seq: int
    error: str | None


@dataclass(frozen=True)
class FlushResult(_Checked):
    """What one flush wrote: this rank's bytes, its seconds, and its error (None: committed)."""

    nbytes: int
    seconds: float
    error: str | None
    cpu_seconds: float
    """The flusher's process CPU clock when the flush ended: a run's CPU per version, its first
    version's one-time work apart (``scripts/bench_startup.py --part cpu-per-gb``)."""


@dataclass(frozen=True)
class Done(_Checked):
    """Job ``job_id`` ended: ``result`` None if it was skipped (superseded on every rank)."""

    job_id: int
    result: FlushResult | None
    spans: tuple
    """Trace spans ``(name, category, start_ns, end_ns, args)`` of the flush (``--trace-dir``)."""


@dataclass(frozen=True)
class Fatal(_Checked):
    """The flusher failed; it exits after this."""

    traceback: str


@dataclass(frozen=True)
class Stopped(_Checked):
    """Every job is done after :class:`Stop`; the flusher exits."""

    cpu_seconds: float


TO_FLUSHER = (FlusherSpec, Describe, FlushJob, Stop, Abort)
TO_ENGINE = (Ready, Described, Done, Fatal, Stopped)


def _tensor_from_bytes(dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """A CPU tensor of ``dtype`` (``torch.<dtype>``) and ``shape`` over a copy of ``data``."""
    if not data:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


class _Pickler(pickle.Pickler):
    """Pickle, with a plain CPU tensor (the small state's RNG states) crossing as its dtype, shape
    and bytes: torch's own reduce ``torch.save``\ s each storage into a zip on one side and loads
    it on the other, ~1 ms of CPU a request for a few KB."""

    def reducer_override(self, obj):
        if (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
                and not obj.requires_grad and not obj.is_quantized):
            data = obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return _tensor_from_bytes, (str(obj.dtype).removeprefix("torch."), tuple(obj.shape), data)
        return NotImplemented


def send(conn: Connection, message: Any) -> None:
    """Plain pickle over the socket: ``Connection.send`` pickles tensors by handing out shared
    memory through a multiprocessing server that this (not multiprocessing-started) process
    cannot authenticate to; the bytes themselves are what crosses (:class:`_Pickler`)."""
    if not isinstance(message, TO_FLUSHER + TO_ENGINE):
        raise ProtocolError(f"not a message of the engine-flusher protocol: {message!r:.80}")
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    conn.send_bytes(buffer.getbuffer())


def receive(conn: Connection, expected: tuple[type, ...]) -> Any:
    """The next message, one of the ``expected`` types (:data:`TO_FLUSHER` or
    :data:`TO_ENGINE`); raises :class:`ProtocolError` for anything else and ``EOFError`` when
    the other end is gone. The socket is this job's own (a socket pair no other process holds)."""
    message = pickle.loads(conn.recv_bytes())
    if not isinstance(message, expected):
        raise ProtocolError(f"unexpected message {type(message).__name__} ({message!r:.80}); expected one of "
                            f"{', '.join(t.__name__ for t in expected)}")
    return message
