"""A tensor chunk decoded where it lies: the tensor ``torch.load`` would return, over the bytes read.

Each chunk of a data file is a complete ``torch.save`` blob (``checkpointing.format.writer``): a zip of
stored (uncompressed) records, one of them the pickle ``data.pkl`` and one the tensor's bytes,
``data/0``. ``torch.load`` of such a blob copies the bytes into a new storage; a restore then
copies them again into the live arrays. :func:`decode_tensor` instead parses the zip's central
directory and the pickle itself and returns a tensor made with ``torch.frombuffer`` over the
data record, so that the only copy is the one into the live array.

Nothing of the pickle is executed: its opcodes are read with :func:`pickletools.genops` (which
only tokenises) and interpreted by a small machine that knows the one shape ``torch.save`` gives
a plain tensor::

    torch._utils._rebuild_tensor_v2(
        persistent_id(("storage", torch.<Type>Storage, "<key>", "cpu", numel)),
        storage_offset, size, stride, requires_grad, collections.OrderedDict())

and names only those globals (it never imports them). Anything else (another global, an opcode
outside that subset, a non-contiguous or offset tensor, a compressed record, a big-endian file,
a dtype without a typed storage name) raises :class:`FramingError`; the caller then falls back to
``torch.load(weights_only=True)`` (``checkpointing.base.safe_pickle``), which reads every blob it read
before, or names the damage. So this decoder only ever narrows what is accepted.
"""

from __future__ import annotations

import math
import pickletools
import struct
import sys

import torch

__all__ = ["FramingError", "decode_tensor"]


class FramingError(ValueError):
    """The bytes are not a ``torch.save`` of one plain contiguous CPU tensor, as parsed here."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
"""The typed storage names ``torch.save`` writes for these dtypes (others: ``torch.load``)."""

_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")

_OTHER_RECORDS = {"byteorder", "version", ".data/version", ".format_version", ".storage_alignment",
                  ".data/serialization_id"}
"""Records besides ``data.pkl`` and ``data/<key>`` that ``torch.save`` writes; none is needed
here except ``byteorder`` (checked)."""

_MAX_RECORDS = 32
_ALLOWED_FLAGS = 0x0002 | 0x0004 | 0x0008 | 0x0800
_DIRECTORY = 0x10
"""The MS-DOS directory bit of a record's external attributes."""
_MAX_PICKLE = 64 << 10

_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")


def _records(blob: memoryview) -> dict[str, tuple[int, int]]:
    """Name -> (start, size) of each stored record of the zip ``blob``, from its central
    directory (as ``torch.load``'s reader finds them)."""
    end = len(blob)
    if end < _EOCD.size:
        raise FramingError("too short for a zip")
    sig, disk, cd_disk, entries_here, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(blob, end - _EOCD.size)
    if sig != b"PK\x05\x06" or comment or disk or cd_disk or entries_here != entries:
        raise FramingError("no end of central directory where a zip ends")
    directory_end = end - _EOCD.size
    locator = directory_end - _ZIP64_LOCATOR.size
    if locator >= 0 and blob[locator : locator + 4] == b"PK\x06\x07":
        _, locator_disk, zip64_at, disks = _ZIP64_LOCATOR.unpack_from(blob, locator)
        if locator_disk or disks != 1 or zip64_at + _ZIP64_EOCD.size > locator:
            raise FramingError("bad zip64 locator")
        short = entries, cd_size, cd_offset
        sig, size, _, _, disk, cd_disk, entries_here, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack_from(blob, zip64_at)
        if (sig != b"PK\x06\x06" or size != _ZIP64_EOCD.size - 12 or disk or cd_disk or entries_here != entries
                or any(s not in (v, 0xFFFF, 0xFFFFFFFF) for s, v in zip(short, (entries, cd_size, cd_offset)))):
            raise FramingError("bad zip64 end of central directory")
        directory_end = zip64_at
    elif entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        raise FramingError("zip64 sizes without a zip64 record")
    if not 0 < entries <= _MAX_RECORDS or cd_offset + cd_size > directory_end:
        raise FramingError(f"central directory of {entries} records at {cd_offset}+{cd_size} out of range")
    records: dict[str, tuple[int, int]] = {}
    at = cd_offset
    for _ in range(entries):
        if at + _CENTRAL.size > cd_offset + cd_size:
            raise FramingError("central directory overruns")
        (sig, _, _, flags, method, _, _, _, csize, usize, name_len, extra_len, comment_len, disk, _, attributes,
         local) = _CENTRAL.unpack_from(blob, at)
        name_at = at + _CENTRAL.size
        extra_at = name_at + name_len
        at = extra_at + extra_len + comment_len
        if sig != b"PK\x01\x02" or at > cd_offset + cd_size or disk:
            raise FramingError("bad central directory record")
        # Stored, and no flag but the data descriptor, UTF-8 names and deflate's options (what
        # torch.save writes); not a directory (miniz reads none of its bytes).
        if method != 0 or flags & ~_ALLOWED_FLAGS or attributes & _DIRECTORY:
            raise FramingError("a compressed, encrypted or directory record")
        wide = [v == 0xFFFFFFFF for v in (usize, csize, local)]
        if any(wide):
            values = _zip64_extra(blob[extra_at : extra_at + extra_len], sum(wide))
            usize, csize, local = (values.pop(0) if w else v for w, v in zip(wide, (usize, csize, local)))
        name = bytes(blob[name_at:extra_at]).decode("utf-8", "strict") if name_len else ""
        if csize != usize or name in records or not name or name.endswith("/"):
            raise FramingError(f"record {name!r}: sizes differ or the name repeats")
        if local + _LOCAL.size > cd_offset:
            raise FramingError(f"record {name!r}: local header out of range")
        sig, _, _, local_method, _, _, _, _, _, local_name_len, local_extra_len = _LOCAL.unpack_from(blob, local)
        start = local + _LOCAL.size + local_name_len + local_extra_len
        if (sig != b"PK\x03\x04" or local_method != 0
                or bytes(blob[local + _LOCAL.size : local + _LOCAL.size + local_name_len]) != name.encode()):
            raise FramingError(f"record {name!r}: local header differs from the central directory")
        if start + usize > cd_offset:
            raise FramingError(f"record {name!r} runs into the central directory")
        records[name] = (start, usize)
    if at != cd_offset + cd_size:
        raise FramingError("central directory size differs from its records")
    return records


def _zip64_extra(extra: memoryview, count: int) -> list[int]:
    at = 0
    while at + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, at)
        if tag == 0x0001:
            if size < 8 * count or at + 4 + size > len(extra):
                raise FramingError("short zip64 extra field")
            return list(struct.unpack_from(f"<{count}Q", extra, at + 4))
        at += 4 + size
    raise FramingError("zip64 sizes without their extra field")


class _Global:
    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class _Storage:
    __slots__ = ("dtype", "key", "location", "numel")

    def __init__(self, dtype: torch.dtype, key: str, location: str, numel: int):
        self.dtype, self.key, self.location, self.numel = dtype, key, location, numel


class _Tensor:
    """What ``_rebuild_tensor_v2`` would be called with; never changed once made (cached)."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _EmptyDict:
    """``OrderedDict()``: the backward hooks of a saved tensor, always none here."""


_MARK = object()
_EMPTY = _EmptyDict()
_INTS = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"}
_STRINGS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}
_PUTS = {"BINPUT", "LONG_BINPUT", "PUT"}
_GETS = {"BINGET", "LONG_BINGET", "GET"}


def _ints(value) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


_INTERPRETED: dict[bytes, _Tensor] = {}
"""Pickles already read, by their bytes: chunks of one kind of parameter repeat a few pickles,
and reading one allocates a tuple per opcode (allocations trigger the garbage collector's full
passes over a trainer's heap, each a pause of its own)."""


def _interpret(pickle: bytes) -> _Tensor:
    """The tensor description in ``pickle``, read without executing it (see the module doc)."""
    known = _INTERPRETED.get(pickle)
    if known is None:
        known = _interpret_opcodes(pickle)
        if len(_INTERPRETED) >= 4096:
            _INTERPRETED.clear()
        _INTERPRETED[pickle] = known
    return known


def _interpret_opcodes(pickle: bytes) -> _Tensor:
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    try:
        ops = list(pickletools.genops(pickle))
    except Exception as error:  # genops raises ValueError and others on damaged opcodes
        raise FramingError(f"unreadable pickle: {error}") from None
    for opcode, arg, _ in ops:
        name = opcode.name
        if name == "PROTO":
            if not 2 <= arg <= 5:
                raise FramingError(f"pickle protocol {arg}")
        elif name == "FRAME":
            pass
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            if (module, attr) not in (_REBUILD, _ORDERED_DICT) and not (module == "torch" and attr in _STORAGE_DTYPES):
                raise FramingError(f"the pickle names {module}.{attr}")
            stack.append(_Global(module, attr))
        elif name in _PUTS:
            if not stack or stack[-1] is _MARK:
                raise FramingError("memo of nothing")
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            if not stack or stack[-1] is _MARK:
                raise FramingError("memo of nothing")
            memo[len(memo)] = stack[-1]
        elif name in _GETS:
            if arg not in memo:
                raise FramingError(f"memo {arg} unset")
            stack.append(memo[arg])
        elif name == "MARK":
            marks.append(len(stack))
            stack.append(_MARK)
        elif name == "TUPLE":
            if not marks:
                raise FramingError("tuple without a mark")
            at = marks.pop()
            items = tuple(stack[at + 1 :])
            del stack[at:]
            stack.append(items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}[name]
            items = tuple(stack[len(stack) - n :]) if n else ()
            if len(items) != n or any(i is _MARK for i in items):
                raise FramingError("tuple of too few items")
            del stack[len(stack) - n :]
            stack.append(items)
        elif name in _INTS or name in _STRINGS:
            stack.append(arg)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "BINPERSID":
            pid = stack.pop() if stack else None
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
                    and pid[1].module == "torch" and pid[1].name in _STORAGE_DTYPES and isinstance(pid[2], str)
                    and isinstance(pid[3], str) and type(pid[4]) is int and pid[4] >= 0):
                raise FramingError("a persistent id that is not a typed storage")
            stack.append(_Storage(_STORAGE_DTYPES[pid[1].name], pid[2], pid[3], pid[4]))
        elif name == "REDUCE":
            if len(stack) < 2:
                raise FramingError("reduce of nothing")
            args, func = stack.pop(), stack.pop()
            if not isinstance(func, _Global) or not isinstance(args, tuple):
                raise FramingError("reduce of something not callable")
            if (func.module, func.name) == _ORDERED_DICT and args == ():
                stack.append(_EMPTY)
            elif ((func.module, func.name) == _REBUILD and len(args) == 6 and isinstance(args[0], _Storage)
                  and type(args[1]) is int and _ints(args[2]) and _ints(args[3]) and len(args[2]) == len(args[3])
                  and args[4] is False and args[5] is _EMPTY):
                stack.append(_Tensor(args[0], args[1], args[2], args[3]))
            else:
                raise FramingError(f"a call of {func.module}.{func.name} this decoder does not make")
        elif name == "STOP":
            if len(stack) != 1 or marks or not isinstance(stack[0], _Tensor):
                raise FramingError("the pickle is not one tensor")
            return stack[0]
        else:
            raise FramingError(f"pickle opcode {name}")
    raise FramingError("the pickle does not stop")


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """``torch``'s rule: dimensions of one element may have any stride."""
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1:
            if s != expected:
                return False
            expected *= n
    return True


def decode_tensor(blob: memoryview) -> torch.Tensor:
    """The tensor that ``torch.load(blob, weights_only=True)`` returns, over ``blob``'s memory.

    ``blob``: a writable buffer (the tensor shares it: keep it alive and unchanged while the
    tensor is used). Raises :class:`FramingError` where the bytes are not a ``torch.save`` of one
    plain contiguous CPU tensor of a typed storage (the caller falls back to ``torch.load``).
    """
    try:
        return _decode(memoryview(blob).cast("B"))
    except FramingError:
        raise
    except (struct.error, UnicodeError, ValueError, TypeError, OverflowError, IndexError, KeyError, RuntimeError) as error:
        raise FramingError(f"unreadable framing: {error}") from None  # damaged bytes; torch.load names them


def _decode(blob: memoryview) -> torch.Tensor:
    """:func:`decode_tensor` of a byte view."""
    records = _records(blob)
    prefix = next(iter(records)).split("/", 1)[0]
    pickle_at = records.get(f"{prefix}/data.pkl")
    if pickle_at is None or pickle_at[1] > _MAX_PICKLE:
        raise FramingError("no data.pkl")
    data_names = []
    for name in records:
        head, _, rest = name.partition("/")
        if head != prefix or not rest:
            raise FramingError(f"record {name!r} outside the archive {prefix!r}")
        if rest.startswith("data/"):
            data_names.append(rest[5:])
        elif rest != "data.pkl" and rest not in _OTHER_RECORDS:
            raise FramingError(f"unexpected record {name!r}")
    def record(name: str) -> bytes | None:
        at = records.get(f"{prefix}/{name}")
        return None if at is None else bytes(blob[at[0] : at[0] + at[1]])

    if record("byteorder") != b"little" or sys.byteorder != "little":
        raise FramingError("not a little-endian archive")
    # What torch.load checks besides: the archive's version (its reader takes 1 to 10), and
    # that the storage alignment is a number.
    version = record("version") or record(".data/version")
    if version is None or not version.strip().isascii() or not version.strip().isdigit() or not 1 <= int(version) <= 10:
        raise FramingError(f"archive version {version!r}")
    for name in (".storage_alignment", ".format_version", ".data/serialization_id"):
        value = record(name)
        if value is not None and not value.isdigit():  # torch.load reads them as numbers or text
            raise FramingError(f"{name} {value[:40]!r}")
    start, size = pickle_at
    tensor = _interpret(bytes(blob[start : start + size]))
    storage = tensor.storage
    if data_names != [storage.key] or storage.location != "cpu":
        raise FramingError(f"data records {data_names} for storage {storage.key!r} on {storage.location!r}")
    data_start, data_size = records[f"{prefix}/data/{storage.key}"]
    itemsize = storage.dtype.itemsize
    numel = math.prod(tensor.size)
    if (data_size != storage.numel * itemsize or tensor.offset != 0 or numel != storage.numel or numel == 0
            or not _contiguous(tensor.size, tensor.stride)):
        raise FramingError(f"storage of {storage.numel} elements in {data_size} bytes for a tensor of "
                           f"{tensor.size} (stride {tensor.stride}, offset {tensor.offset})")
    flat = torch.frombuffer(blob[data_start : data_start + data_size], dtype=storage.dtype)
    return flat.as_strided(tensor.size, tensor.stride)
