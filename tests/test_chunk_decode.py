"""The restore path of issue 18: chunks decoded where they were read (``checkpointing.format.chunk_decode``)
and read in large ranges on a thread of their own (``checkpointing.format.reader``).

A chunk decoded in place equals ``torch.load`` of it bit for bit; anything the decoder does not
recognise goes through ``torch.load(weights_only=True)`` as before, so damage is still named and
a pickle that would run code is still refused. The reader's errors name file, tensor, rank and
offset whichever read range a chunk fell in."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import threading

import pytest
import torch
import xxhash

from checkpointing.base.errors import CheckpointCorruptError, CheckpointUntrustedError
from checkpointing.format import reader as reader_module
from checkpointing.format.chunk_decode import FramingError, decode_tensor
from checkpointing.format.items import TensorPiece
from checkpointing.format.metadata import ChunkRecord, build_metadata, write_metadata
from checkpointing.format.reader import CheckpointReader
from checkpointing.format.writer import _without_zip_crc32, data_file_name, standalone, write_rank_file
from tests.helpers import PickleMarker, synthetic_layout

CASES = {
    "fp32 matrix": lambda: torch.randn(37, 129),
    "bf16 matrix": lambda: torch.randn(64, 33).to(torch.bfloat16),
    "fp32 0-d": lambda: torch.tensor(3.25),
    "bf16 0-d": lambda: torch.tensor(-1.5, dtype=torch.bfloat16),
    "fp32 3-d with a dimension of one": lambda: torch.randn(5, 1, 7),
    "bf16 large (written from memory)": lambda: torch.randn(300_001).to(torch.bfloat16),
    "int64": lambda: torch.arange(-5, 1000),
    "fp16 vector": lambda: torch.randn(9).half(),
}


def _saved(tensor: torch.Tensor, crc: bool = False) -> bytes:
    out = io.BytesIO()
    if crc:
        torch.save(tensor, out)
    else:
        with _without_zip_crc32():
            torch.save(tensor, out)
    return out.getvalue()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.mark.parametrize("crc", [False, True], ids=["no-crc", "crc"])
@pytest.mark.parametrize("case", list(CASES))
def test_decoded_in_place_equals_torch_load_bit_for_bit(case, crc):
    torch.manual_seed(0)
    blob = bytearray(_saved(standalone(CASES[case]()), crc))
    expected = torch.load(io.BytesIO(bytes(blob)), weights_only=True)
    decoded = decode_tensor(memoryview(blob))
    assert _same_bits(decoded, expected), case
    address = torch.frombuffer(blob, dtype=torch.uint8).data_ptr()
    assert address <= decoded.data_ptr() < address + len(blob), "decoded where it lies, not copied"


def test_every_chunk_the_writer_frames_decodes_in_place(tmp_path):
    """The writer's own framing (padding before large chunks, cached headers) from the file."""
    torch.manual_seed(1)
    arrays = {"main": torch.randn(1_500_007), "half": torch.randn(700_001).to(torch.bfloat16)}
    pieces = [TensorPiece("w1", "main", 3, (600, 1000), (1200, 1000), (600, 0)),
              TensorPiece("w2", "main", 600_003, (600, 1000), (600, 1000), (0, 0)),
              TensorPiece("tiny", "main", 1_200_003, (17,), (17,), (0,)),
              TensorPiece("h", "half", 1, (700_000,), (700_000,), (0,))]
    records = write_rank_file(str(tmp_path), 0, arrays, pieces, {"n": 1})
    raw = bytearray((tmp_path / data_file_name(0)).read_bytes())
    for record, piece in zip(records, pieces):
        blob = memoryview(raw)[record.offset : record.offset + record.length]
        assert _same_bits(decode_tensor(blob), torch.load(io.BytesIO(bytes(blob)), weights_only=True)), piece.key
        assert torch.equal(decode_tensor(blob), piece.view(arrays))


def _eocd(blob: bytes) -> int:
    return len(blob) - 22


@pytest.mark.parametrize("damage", [
    "truncated", "no end record", "central directory moved", "compressed record", "record renamed",
    "data record shorter", "pickle opcode", "storage of another size", "big-endian"])
def test_damaged_framing_is_refused(damage):
    blob = bytearray(_saved(torch.randn(8, 8)))
    cd_offset = struct.unpack_from("<Q", blob, blob.rindex(b"PK\x06\x06") + 48)[0]
    pkl = blob.index(b"\x80\x02")  # the pickle's first bytes
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "no end record":
        blob[_eocd(blob)] ^= 0xFF
    elif damage == "central directory moved":
        struct.pack_into("<Q", blob, blob.rindex(b"PK\x06\x06") + 48, cd_offset + 7)
    elif damage == "compressed record":
        struct.pack_into("<H", blob, cd_offset + 10, 8)  # deflate
    elif damage == "record renamed":
        at = blob.index(b"archive/byteorder", cd_offset)
        blob[at : at + 17] = b"archive/byteordeX"
    elif damage == "data record shorter":
        at = blob.index(b"archive/data/0", cd_offset) - 46
        struct.pack_into("<II", blob, at + 20, 200, 200)
    elif damage == "pickle opcode":
        blob[pkl + 2] = ord("}")  # EMPTY_DICT where the GLOBAL was
    elif damage == "storage of another size":
        at = blob.index(b"cpuq\x04K@", pkl)  # numel 64, a BININT1
        blob[at + 6] = 63
    elif damage == "big-endian":
        at = blob.index(b"little")
        blob[at : at + 6] = b"bigxxx"
    with pytest.raises(FramingError):
        decode_tensor(memoryview(blob))


def test_a_pickle_naming_code_is_not_run(tmp_path):
    marker = tmp_path / "marker"
    blob = io.BytesIO()
    torch.save(PickleMarker(marker), blob)
    with pytest.raises(FramingError, match="the pickle names"):
        decode_tensor(memoryview(bytearray(blob.getvalue())))
    assert not marker.exists()
    for other in ({"a": torch.ones(2)}, [torch.ones(2)], torch.ones(4)[1:3], torch.ones(3, 4).t(), torch.empty(0)):
        with pytest.raises(FramingError):
            decode_tensor(memoryview(bytearray(_saved(other))))


# -- through the reader -------------------------------------------------------------------------------

def _write_checkpoint(directory, blobs):
    """A checkpoint of one data file made of ``blobs``: (key, offsets, sizes, global shape,
    dtype, bytes), each at a 4 KiB boundary plus 3 bytes (like small objects and padding)."""
    os.makedirs(directory, exist_ok=True)
    name = data_file_name(0)
    records, data = [], bytearray()
    for key, offsets, sizes, global_shape, dtype, raw in blobs:
        data += bytes(-len(data) % 4096 + 3)
        records.append(ChunkRecord(key, offsets, sizes, global_shape, dtype, name, len(data), len(raw),
                                   xxhash.xxh3_64_intdigest(raw), 0))
        data += raw
    common = _saved_object({"iteration": 1})
    records.append(ChunkRecord("common", None, None, None, None, name, len(data), len(common),
                               xxhash.xxh3_64_intdigest(common), 0))
    data += common
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    write_metadata(str(directory), build_metadata(records, 1, synthetic_layout()))
    return str(directory)


def _saved_object(value) -> bytes:
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


@pytest.fixture
def small_window(monkeypatch):
    """Read ranges of 64 KiB, so that a few chunks span several reads and some are larger than one."""
    monkeypatch.setattr(reader_module, "READ_WINDOW", 64 << 10)
    monkeypatch.setattr(reader_module, "READ_GAP", 8 << 10)


def _sharded(tmp_path, rows=96, cols=700):
    """A global (rows, cols) fp32 tensor and a bf16 one saved as 4 row chunks each (one blob
    shared by two keys), read back below in 3 column-and-row pieces."""
    torch.manual_seed(2)
    full = torch.randn(rows, cols)
    half = torch.randn(rows, 40).to(torch.bfloat16)
    blobs = []
    for i in range(4):
        part = slice(i * rows // 4, (i + 1) * rows // 4)
        raw = _saved(standalone(full[part].clone()))
        blobs.append(("w", (part.start, 0), (rows // 4, cols), (rows, cols), torch.float32, raw))
        blobs.append(("w_again", (part.start, 0), (rows // 4, cols), (rows, cols), torch.float32, raw))
        blobs.append(("h", (part.start, 0), (rows // 4, 40), (rows, 40), torch.bfloat16,
                      _saved(standalone(half[part].clone()))))
    directory = _write_checkpoint(tmp_path / "ckpt", blobs)
    return directory, full, half


def _reshard_pieces(rows=96, cols=700):
    pieces, at = [], 0
    for r0, r1, c0, c1 in ((0, 50, 0, 300), (50, 96, 0, 300), (0, 96, 300, 700)):
        pieces.append(TensorPiece("w", "w", at, (r1 - r0, c1 - c0), (rows, cols), (r0, c0)))
        at += (r1 - r0) * (c1 - c0)
    return pieces


@pytest.mark.parametrize("window", ["default", "small"])
def test_resharding_read_in_ranges_equals_the_saved_tensors(tmp_path, request, window):
    if window == "small":
        request.getfixturevalue("small_window")
    directory, full, half = _sharded(tmp_path)
    pieces = _reshard_pieces() + [TensorPiece("h", "h", 0, (96, 40), (96, 40), (0, 0)),
                                   TensorPiece("w_again", "again", 0, (96, 700), (96, 700), (0, 0))]
    arrays = {"w": torch.zeros(96 * 700), "h": torch.zeros(96 * 40, dtype=torch.bfloat16),
              "again": torch.zeros(96 * 700)}
    read = CheckpointReader(directory).read_pieces(pieces, arrays)
    for piece in pieces[:3]:
        (r0, c0), (r, c) = piece.global_offset, piece.shape
        assert torch.equal(piece.view(arrays), full[r0 : r0 + r, c0 : c0 + c])
    assert torch.equal(pieces[3].view(arrays), half) and torch.equal(pieces[4].view(arrays), full)
    info = CheckpointReader(directory).metadata.storage_data
    assert read == sum({(i.relative_path, i.offset): i.length for k, i in info.items() if k.offset}.values()), \
        "each blob counted once, the shared one too"
    assert not [t for t in threading.enumerate() if t.name == "ckpt-read"], "the read thread ended"


def test_a_chunk_read_into_an_array_of_another_dtype_is_converted(tmp_path):
    """bf16 chunks into an fp32 array (and back): converted as ``copy_`` does, not copied as bits."""
    directory, full, half = _sharded(tmp_path)
    arrays = {"h": torch.zeros(96 * 40), "w": torch.zeros(96 * 700, dtype=torch.bfloat16)}
    CheckpointReader(directory).read_pieces([TensorPiece("h", "h", 0, (96, 40), (96, 40), (0, 0)),
                                             TensorPiece("w", "w", 0, (96, 700), (96, 700), (0, 0))], arrays)
    assert torch.equal(arrays["h"].view(96, 40), half.float())
    assert torch.equal(arrays["w"].view(96, 700), full.to(torch.bfloat16))


def test_read_own_pieces_in_ranges(tmp_path, small_window):
    directory, full, half = _sharded(tmp_path)
    pieces = [TensorPiece("w", "w", i * 24 * 700, (24, 700), (96, 700), (i * 24, 0)) for i in range(4)]
    arrays = {"w": torch.zeros(96 * 700)}
    CheckpointReader(directory).read_own_pieces(data_file_name(0), pieces, arrays)
    assert torch.equal(arrays["w"].view(96, 700), full)


def test_buffered_reads_where_o_direct_is_refused(tmp_path, small_window, monkeypatch):
    directory, full, _ = _sharded(tmp_path)
    real_open, real_preadv = os.open, os.preadv
    refused = []

    def no_direct_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    arrays = {"w": torch.zeros(96 * 700)}
    CheckpointReader(directory).read_pieces(_reshard_pieces(), arrays)
    monkeypatch.setattr(os, "open", real_open)

    def refuse_first(fd, buffers, offset):  # an O_DIRECT read refused after the open succeeded
        if not refused and fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse_first)
    again = {"w": torch.zeros(96 * 700)}
    CheckpointReader(directory).read_pieces(_reshard_pieces(), again)
    assert refused or not _takes_o_direct(tmp_path)
    assert torch.equal(arrays["w"], again["w"])
    for piece in _reshard_pieces():
        (r0, c0), (r, c) = piece.global_offset, piece.shape
        assert torch.equal(piece.view(again), full[r0 : r0 + r, c0 : c0 + c])


def _takes_o_direct(directory) -> bool:
    try:
        os.close(os.open(_data(directory / "ckpt"), os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False


def _data(directory):
    return os.path.join(directory, data_file_name(0))


def _offsets(directory, key):
    info = CheckpointReader(directory).metadata.storage_data
    return sorted(i.offset for k, i in info.items() if k.fqn == key)


@pytest.mark.parametrize("verify", [True, False])
def test_damaged_framing_in_a_file_is_a_corrupt_error(tmp_path, small_window, verify):
    directory, _, _ = _sharded(tmp_path)
    at = _offsets(directory, "h")[2]
    with open(_data(directory), "r+b") as f:
        f.seek(at)
        f.write(b"XX")  # the zip's first signature
    pieces = [TensorPiece("h", "h", 0, (96, 40), (96, 40), (0, 0))]
    expected = (f"checksum mismatch in {_data(directory)} (tensor h, written by rank 0) at offset {at}" if verify
                else "cannot decode chunk (48, 0) of h")
    with pytest.raises(CheckpointCorruptError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        CheckpointReader(directory, verify=verify).read_pieces(pieces, {"h": torch.zeros(96 * 40, dtype=torch.bfloat16)})
    assert not [t for t in threading.enumerate() if t.name == "ckpt-read"], "the read thread ended"


def test_truncated_and_missing_files_name_file_tensor_rank_and_offset(tmp_path, small_window):
    directory, _, _ = _sharded(tmp_path)
    offsets = _offsets(directory, "w")
    cut = offsets[2] + 100
    os.truncate(_data(directory), cut)
    pieces = _reshard_pieces()
    with pytest.raises(CheckpointCorruptError) as raised:
        CheckpointReader(directory).read_pieces(pieces, {"w": torch.zeros(96 * 700)})
    length = CheckpointReader(directory).metadata.storage_data
    length = next(i.length for i in length.values() if i.offset == offsets[2])
    assert str(raised.value) == (f"truncated data file {_data(directory)} (tensor w, written by rank 0): "
                                 f"100 of {length} bytes at offset {offsets[2]}")
    os.unlink(_data(directory))
    with pytest.raises(CheckpointCorruptError, match="missing data file .*tensor w, written by rank 0"):
        CheckpointReader(directory).read_pieces(pieces, {"w": torch.zeros(96 * 700)})


def test_a_tensor_chunk_whose_pickle_names_code_is_refused_unless_trusted(tmp_path):
    """Checksums match (whoever wrote the chunk wrote the metadata too): the decoder passes the
    chunk to ``torch.load(weights_only=True)``, which refuses it without running it."""
    marker = tmp_path / "marker"
    raw = _saved_object(PickleMarker(marker))
    directory = _write_checkpoint(tmp_path / "ckpt", [("w", (0,), (4,), (4,), torch.float32, raw)])
    piece = TensorPiece("w", "w", 0, (4,), (4,), (0,))
    with pytest.raises(CheckpointUntrustedError, match="--trust-checkpoint-pickles"):
        CheckpointReader(directory).read_pieces([piece], {"w": torch.zeros(4)})
    assert not marker.exists()


def test_a_chunk_of_another_shape_than_its_metadata_is_a_corrupt_error(tmp_path):
    raw = _saved(torch.ones(2, 3))
    directory = _write_checkpoint(tmp_path / "ckpt", [("w", (0, 0), (3, 2), (3, 2), torch.float32, raw)])
    piece = TensorPiece("w", "w", 0, (3, 2), (3, 2), (0, 0))
    with pytest.raises(CheckpointCorruptError, match=r"stored shape \(2, 3\), the metadata says \(3, 2\)"):
        CheckpointReader(directory).read_pieces([piece], {"w": torch.zeros(6)})


def test_a_chunk_the_decoder_does_not_know_is_read_by_torch_load(tmp_path):
    """A view saved with its whole storage (offset 2 of 10): not decoded in place, read as before."""
    base = torch.arange(10.0)
    raw = _saved(base[2:6])
    directory = _write_checkpoint(tmp_path / "ckpt", [("w", (0,), (4,), (4,), torch.float32, raw)])
    arrays = {"w": torch.zeros(4)}
    CheckpointReader(directory).read_pieces([TensorPiece("w", "w", 0, (4,), (4,), (0,))], arrays)
    assert arrays["w"].tolist() == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load of a damaged protocol byte
@pytest.mark.parametrize("crc", [False, True], ids=["no-crc", "crc"])
@pytest.mark.parametrize("case", ["fp32 matrix", "bf16 0-d"])
def test_any_damaged_byte_is_refused_or_decodes_as_torch_load_does(case, crc):
    """Every byte of a chunk's framing damaged in turn (the tensor's bytes aside: any value is a
    value), with a few patterns: the decoder either refuses the bytes (the reader then goes
    through torch.load, which names the damage) or returns what torch.load returns, bit for bit;
    it never raises anything else. (Run with every pattern 1-255 while writing the decoder: it
    found the checks for directory records, flags, disks and the metadata records.)"""
    torch.manual_seed(3)
    tensor = standalone(CASES[case]())
    clean = _saved(tensor, crc)
    data_at = clean.index(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    refused = 0
    for at in range(len(clean)):
        if data_at <= at < data_at + tensor.nbytes:
            continue
        for pattern in (0x01, 0x10, 0x5A, 0x80, 0xFF):
            blob = bytearray(clean)
            blob[at] ^= pattern
            try:
                decoded = decode_tensor(memoryview(blob))
            except FramingError:
                refused += 1
                continue
            try:
                loaded = torch.load(io.BytesIO(bytes(blob)), weights_only=True)
            except Exception as error:  # noqa: BLE001 - anything torch.load refuses, the decoder must refuse
                raise AssertionError(f"byte {at} ^ {pattern:#x}: decoded, but torch.load refuses it ({error})") from None
            assert _same_bits(decoded, loaded), f"byte {at} ^ {pattern:#x}"
    assert refused > len(clean) - tensor.nbytes  # most damage is refused
