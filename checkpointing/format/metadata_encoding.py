"""A level's ``.metadata`` pickled from parts: what never changes once, what does per version.

Pickling DCP's ``Metadata`` costs CPU per chunk: every ``MetadataIndex`` and ``_StorageInfo`` in it
goes through a Python ``__getstate__``. For the CPU bench's host-bound model (~590 chunks a
version) that was ~20 ms a version, a fifth of the flusher's CPU. From one version of a level to
the next only the byte items' places, the rare moved chunk and our facts (``gpt_ckpt``: the
iteration, the checksums) change, so :class:`MetadataEncoder` pickles the rest once and each
version appends only what changed.

A pickle is a program for a stack machine, and the one built here is the program ``pickle``
writes for a ``Metadata``: make the object (``NEWOBJ``), push its state dict, ``BUILD``. The state's
``storage_data`` dict is pickled once, then completed per version by a ``SETITEMS`` of the entries
that changed (a later value for a key replaces the earlier one in place, so the keys keep their
order). Each part is a complete pickle of its own object with its ``PROTO`` and ``STOP`` cut off;
its memo references point only at entries it made itself, so parts placed one after another can
reuse memo slots without meeting. Protocol 2, because from protocol 4 on a pickle is cut into
frames, which do not survive being cut again. Any unpickler reads the result as it reads the
stock pickle: DCP's ``FileSystemReader``, ``checkpointing.base.safe_pickle``'s restricted one.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

_PROTOCOL = 2
_HEADER = b"\x80\x02"  # PROTO 2
_MARK, _SETITEMS, _BUILD, _STOP = b"(", b"u", b"b", b"."
_EMPTY_TUPLE, _NEWOBJ, _EMPTY_DICT = b")", b"\x81", b"}"
FACTS = "gpt_ckpt"
"""The attribute that holds our facts (``checkpointing.format.metadata``)."""


def part(value: Any) -> bytes:
    """The pickle opcodes that push ``value``: a whole pickle without its ``PROTO`` and ``STOP``."""
    data = pickle.dumps(value, protocol=_PROTOCOL)
    if not (data.startswith(_HEADER) and data.endswith(_STOP)):  # pickle's own framing of protocol 2
        raise ValueError(f"pickle of {type(value).__name__} is not a protocol-2 stream")
    return data[len(_HEADER) : -len(_STOP)]


class MetadataEncoder:
    """Pickles versions of one metadata: ``base``'s fields but ``storage_data`` entries and our
    facts, which :meth:`encode` takes per version."""

    def __init__(self, base: Metadata):
        state = dict(base.__dict__)  # every dataclass field, and our facts
        storage_data = state.pop("storage_data")
        state.pop(FACTS, None)
        head = [_HEADER, part(type(base)), _EMPTY_TUPLE, _NEWOBJ, _EMPTY_DICT, _MARK]
        for name, value in state.items():
            head += [part(name), part(value)]
        head += [part("storage_data"), part(storage_data)]
        self._head = b"".join(head)
        """Everything up to the open ``storage_data`` dict, on the stack inside the state's MARK."""

    def encode(self, storage_updates: dict, facts: dict) -> bytes:
        """The ``.metadata`` bytes of the base with ``storage_updates`` set in its
        ``storage_data`` and ``facts`` as its ``gpt_ckpt``."""
        parts = [self._head, _MARK]
        for key, value in storage_updates.items():
            parts += [part(key), part(value)]
        parts += [_SETITEMS, part(FACTS), part(facts), _SETITEMS, _BUILD, _STOP]
        return b"".join(parts)
