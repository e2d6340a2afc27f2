"""An L0 slot's description file: its checksummed frame, and a reading of it without torch.

A description (``<slot>.meta``: version, small state, layout) is a ``torch.save`` blob behind a
header of magic, xxh3-64 and length (``host_pool`` writes it, and reads it back with
``weights_only``). Apart from ``host_pool`` because it imports no torch: ``rollback.sh --list``
needs only each slot's version, and importing torch to read it cost a listing ~1 s where a job
holds slots (:func:`read_plain_description`).

A flusher's description holds only builtins: its small state as byte items, its pieces and
arrays encoded. ``torch.save`` of builtins is a zip whose ``data.pkl`` is a protocol-2 pickle
that names one global, ``_codecs.encode`` (how protocol 2 writes ``bytes``). That is all the
reader here admits; a description holding anything else (a tensor in an older description's
``objects``) raises :class:`NeedsTorchError`, and the caller reads it with ``host_pool``'s reader.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import struct
import zipfile

import xxhash

from checkpointing.base import private_files
from checkpointing.base.errors import CheckpointError

DESCRIPTION_MAGIC = b"GPTL0D1\n"
DESCRIPTION_HEAD = struct.Struct("<8sQQ")
"""A description file: magic, xxh3-64 and length of the ``torch.save`` bytes that follow."""
DESCRIPTION_BYTES_MAX = 1 << 30
OBJECT_BLOBS = "object_blobs"
"""A description's small state as byte items (``{name: torch.save bytes}``), where the flusher
encoded it once for the description and the rank files; else it is under ``objects``."""


class NeedsTorchError(Exception):
    """A description this reader cannot read without torch (not damaged: read it with ``host_pool``)."""


def framed_description(blob: bytes) -> bytes:
    """A description's bytes as its file holds them: checksummed, so that a flipped bit is found
    before anything is decoded (a flip inside the pickle could otherwise change an RNG state or
    where a tensor lies, and be read back silently)."""
    return DESCRIPTION_HEAD.pack(DESCRIPTION_MAGIC, xxhash.xxh3_64_intdigest(blob), len(blob)) + blob


def verified_description_bytes(data: bytes, where: str) -> bytes:
    """The ``torch.save`` bytes of a description file, checked against its checksum; raises
    :class:`CheckpointError` (damaged: not recovered, not decoded)."""
    head = DESCRIPTION_HEAD.size
    if len(data) < head or data[:len(DESCRIPTION_MAGIC)] != DESCRIPTION_MAGIC:
        raise CheckpointError(f"L0 description {where} has no checksum header (damaged, or written by an older "
                              "version); not recovered, nothing in it was decoded")
    _, checksum, length = DESCRIPTION_HEAD.unpack_from(data)
    blob = data[head:]
    if length != len(blob) or xxhash.xxh3_64_intdigest(blob) != checksum:
        raise CheckpointError(f"L0 description {where} does not match its checksum (damaged); not recovered, "
                              "nothing in it was decoded")
    return blob


def checked_slot_description(description, meta_path: str) -> dict:
    """``description`` (decoded) if it is what a slot's description is: a dict with an integer
    ``version``, a ``layout``, and the small state as ``objects`` or as byte items under
    :data:`OBJECT_BLOBS`. Raises :class:`CheckpointError` otherwise (both readers' rule)."""
    if (not isinstance(description, dict) or not {"version", "layout"} <= set(description)
            or not isinstance(description["version"], int) or not {"objects", OBJECT_BLOBS} & set(description)):
        raise CheckpointError(f"L0 description {meta_path} does not describe a slot")
    if OBJECT_BLOBS in description:
        blobs = description[OBJECT_BLOBS]
        if not isinstance(blobs, dict) or not all(isinstance(b, bytes) for b in blobs.values()):
            raise CheckpointError(f"L0 description {meta_path}: its small state is not a set of byte items")
    return description


def read_verified(meta_path: str) -> bytes | None:
    """The checked ``torch.save`` bytes of the description at ``meta_path``, or None if there is
    none. Raises :class:`private_files.UnsafePathError` if the file is not this user's alone (not
    read) and :class:`CheckpointError` if it is damaged."""
    try:
        private_files.check(meta_path)
    except private_files.UnsafePathError:
        if not os.path.lexists(meta_path):
            return None
        raise
    with open(meta_path, "rb") as f:
        return verified_description_bytes(f.read(DESCRIPTION_BYTES_MAX + 1), meta_path)


class _BuiltinsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # protocol 2's bytes: encode(str, "latin1")
            return codecs.encode
        raise NeedsTorchError(f"names {module}.{name}")

    def persistent_load(self, pid):
        raise NeedsTorchError("holds a tensor")


def read_plain_description(meta_path: str) -> dict | None:
    """The description at ``meta_path`` as builtins, without torch: its byte items (a flusher's
    small state, its pieces) left as bytes. None if there is none. Raises
    :class:`private_files.UnsafePathError` (not this user's alone), :class:`CheckpointError`
    (damaged, or not a description) and :class:`NeedsTorchError` (read it with ``host_pool``)."""
    blob = read_verified(meta_path)
    if blob is None:
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(names) != 1:
                raise CheckpointError(f"L0 description {meta_path} is not a torch.save archive (its pickles: {names})")
            data = archive.read(names[0])
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile's errors on this user's own bytes are many (BadZipFile, zlib, ...)
        raise CheckpointError(f"L0 description {meta_path} is not a torch.save archive: {error}") from error
    try:
        description = _BuiltinsUnpickler(io.BytesIO(data)).load()
    except NeedsTorchError:
        raise
    except Exception as error:  # noqa: BLE001 - an unpickler's errors on bad bytes are many; none runs code here
        raise CheckpointError(f"L0 description {meta_path} cannot be read: {error}") from error
    return checked_slot_description(description, meta_path)
