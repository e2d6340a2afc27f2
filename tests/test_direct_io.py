"""The data file writer: O_DIRECT from memory where the file system allows it, the same bytes
through the page cache where it does not, and errors that name the file."""

import errno
import io
import os

import pytest
import torch

from checkpointing.base import direct_io
from checkpointing.base.direct_io import BLOCK, DirectFile
from checkpointing.base.durable import CheckpointWriteError
from checkpointing.format.items import TensorPiece
from checkpointing.format.writer import data_file_name, write_rank_file


def _state():
    torch.manual_seed(0)
    main = torch.randn(1_500_007)
    half = torch.randn(700_001).to(torch.bfloat16)
    arrays = {"main": main, "half": half}
    pieces = [
        TensorPiece("w1", "main", 3, (600, 1000), (1200, 1000), (600, 0)),
        TensorPiece("w2", "main", 600_003, (600, 1000), (600, 1000), (0, 0)),  # same shape as w1
        TensorPiece("tiny", "main", 1_200_003, (17,), (17,), (0,)),
        TensorPiece("odd", "main", 1_200_020, (299_987,), (299_987,), (0,)),
        TensorPiece("h", "half", 1, (700_000,), (700_000,), (0,)),
        TensorPiece("w1_again", "main", 3, (600, 1000), (1200, 1000), (600, 0)),  # shares w1's blob
    ]
    objects = {"iteration": 7, "rng": torch.get_rng_state(), "empty": torch.empty(0)}
    return arrays, pieces, objects


def _check_file(directory, arrays, pieces, objects, records):
    raw = (directory / data_file_name(0)).read_bytes()
    assert len(raw) == max(r.offset + r.length for r in records), "the file ends where its last blob ends"
    by_key = {r.key: r for r in records}
    for piece in pieces:
        r = by_key[piece.key]
        loaded = torch.load(io.BytesIO(raw[r.offset : r.offset + r.length]))
        assert loaded.dtype == arrays[piece.array].dtype
        assert torch.equal(loaded, piece.view(arrays)), piece.key
    for key, value in objects.items():
        r = by_key[key]
        loaded = torch.load(io.BytesIO(raw[r.offset : r.offset + r.length]), weights_only=False)
        assert torch.equal(loaded, value) if isinstance(value, torch.Tensor) else loaded == value
    assert by_key["w1"].offset == by_key["w1_again"].offset
    return raw


def test_round_trip_and_large_chunks_written_from_memory(tmp_path, monkeypatch):
    arrays, pieces, objects = _state()
    if not DirectFile(str(tmp_path / "probe")).direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    writes = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def spy(fd, data, offset):
        writes.append((torch.frombuffer(data, dtype=torch.uint8).data_ptr() if len(data) else 0, len(data), offset))
        return real_pwrite(fd, data, offset)

    def spy_batch(fd, buffers, offset):  # each buffer of a batch, at its own offset
        at = offset
        for data in buffers:
            writes.append((torch.frombuffer(data, dtype=torch.uint8).data_ptr() if len(data) else 0, len(data), at))
            at += len(data)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", spy)
    monkeypatch.setattr(direct_io.os, "pwritev", spy_batch)
    records = write_rank_file(str(tmp_path), 0, arrays, pieces, objects)
    _check_file(tmp_path, arrays, pieces, objects, records)
    main = arrays["main"]
    lo, hi = main.data_ptr(), main.data_ptr() + main.nbytes
    from_memory = [n for address, n, _ in writes if lo <= address < hi]
    assert sum(from_memory) > 0.9 * 4 * 1_500_000, "the large fp32 chunks went to the file without a staging copy"
    assert all(address % BLOCK == 0 and n % BLOCK == 0 and offset % BLOCK == 0 for address, n, offset in writes)


def test_file_system_refusing_o_direct_gets_the_same_content(tmp_path, monkeypatch):
    arrays, pieces, objects = _state()
    real_fcntl = direct_io.fcntl.fcntl

    def no_direct(fd, command, *arg):
        if command == direct_io.fcntl.F_SETFL and arg and arg[0] & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, *arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", no_direct)
    records = write_rank_file(str(tmp_path), 0, arrays, pieces, objects)
    raw = _check_file(tmp_path, arrays, pieces, objects, records)
    assert not DirectFile(str(tmp_path / "probe")).direct
    blobs = sorted({(r.offset, r.length) for r in records})
    assert all(a + n == b for (a, n), (b, _) in zip(blobs, blobs[1:])), "buffered: no padding between blobs"
    assert len(raw) == sum(n for _, n in blobs)


def test_o_direct_write_refused_after_open_falls_back(tmp_path, monkeypatch):
    arrays, pieces, objects = _state()
    refused = []

    def refusing(real):
        def write(fd, data, offset):
            import fcntl
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)
        return write

    monkeypatch.setattr(direct_io.os, "pwrite", refusing(os.pwrite))
    monkeypatch.setattr(direct_io.os, "pwritev", refusing(os.pwritev))
    records = write_rank_file(str(tmp_path), 0, arrays, pieces, objects)
    _check_file(tmp_path, arrays, pieces, objects, records)
    if DirectFile(str(tmp_path / "probe")).direct:
        assert refused, "the first O_DIRECT write was refused and the rest went buffered"


def test_disk_full_midway_names_file_and_rank(tmp_path, monkeypatch):
    arrays, pieces, objects = _state()
    calls = []

    def full_after_one(real):
        def write(fd, data, offset):
            calls.append(offset)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)
        return write

    monkeypatch.setattr(direct_io.os, "pwrite", full_after_one(os.pwrite))
    monkeypatch.setattr(direct_io.os, "pwritev", full_after_one(os.pwritev))
    monkeypatch.setattr(direct_io, "BATCH_BUFFERS", 2)  # several writes, so that the second is midway
    with pytest.raises(CheckpointWriteError) as error:
        write_rank_file(str(tmp_path), 3, arrays, pieces, objects)
    assert error.value.errno == errno.ENOSPC
    assert "rank 3" in str(error.value) and str(tmp_path / data_file_name(3)) in str(error.value)


def test_direct_file_keeps_bytes_in_order_across_the_staging_buffer(tmp_path):
    """Small writes larger than the staging buffer, and buffers written from memory at every
    residue, land where ``position`` said they would."""
    path = tmp_path / "f"
    expected = bytearray()
    source = torch.arange(3 * 2**20, dtype=torch.uint8)
    with DirectFile(str(path), staging_bytes=64 * 1024) as f:
        for i, start in enumerate([0, 1, 511, 4095, 4096, 12345]):
            small = bytes([i]) * (100 + 70_000 * (i % 2))
            f.write(small)
            expected += small
            gap = f.gap_before(0, source.data_ptr() + start, 2**20)
            f.write(bytes(gap))
            expected += bytes(gap)
            view = memoryview(source[start : start + 2**20].numpy())
            assert f.position == len(expected)
            f.write_memory(view, source.data_ptr() + start)
            expected += view.tobytes()
    assert path.read_bytes() == bytes(expected)


def test_views_and_transposed_tensors_among_objects_are_saved_as_they_are(tmp_path):
    """Only tensors over exactly their own storage take the framing cached per dtype and shape;
    a view into a larger storage or a transposed tensor of a shape written before is saved as
    ``torch.save`` saves it (the whole storage), not as a contiguous tensor of that shape."""
    arrays, pieces, _ = _state()
    objects = {
        "prefix": torch.arange(601 * 1000, dtype=torch.float32).view(601, 1000)[:600],  # w1's shape
        "transposed": torch.arange(1000 * 600, dtype=torch.float32).view(1000, 600).t(),  # w1's shape
        "tail": torch.arange(10_000, dtype=torch.float32)[7:],
    }
    records = write_rank_file(str(tmp_path), 0, arrays, pieces, objects)
    _check_file(tmp_path, arrays, pieces, objects, records)
    for r in records:
        if r.key in objects:
            stock = io.BytesIO()
            torch.save(objects[r.key], stock)
            assert r.length == len(stock.getvalue()), r.key


def test_a_link_planted_under_a_data_file_name_is_not_followed(tmp_path):
    """A data file is created new: a symlink someone placed under its name is refused, and its
    target is untouched."""
    arrays, pieces, objects = _state()
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, tmp_path / "__0_0.distcp")
    with pytest.raises(OSError):
        write_rank_file(str(tmp_path), 0, arrays, pieces, objects)
    assert target.read_bytes() == b"precious"


def test_versions_written_through_a_kept_layout_are_the_files_worked_out_afresh(tmp_path):
    """A level keeps one ``RankFileLayout`` per slot (``layouts``): every later version follows it.
    Each version's file equals, byte for byte, the one written without a kept layout, with this
    version's checksums; moved arrays or other pieces get a layout of their own."""
    arrays, pieces, objects = _state()
    layouts: dict = {}
    for version in range(3):
        for array in arrays.values():  # new bytes at the same addresses, as a pool slot gets
            array.copy_(torch.randn(array.shape).to(array.dtype))
        kept, fresh = tmp_path / f"kept{version}", tmp_path / f"fresh{version}"
        kept.mkdir()
        fresh.mkdir()
        records = write_rank_file(str(kept), 0, arrays, pieces, objects, layouts=layouts)
        assert records == write_rank_file(str(fresh), 0, arrays, pieces, objects)
        assert _check_file(kept, arrays, pieces, objects, records) == (fresh / data_file_name(0)).read_bytes()
        assert len(layouts) == 1
    moved = {name: array.clone() for name, array in arrays.items()}  # another slot: other addresses
    (tmp_path / "moved").mkdir()
    _check_file(tmp_path / "moved", moved, pieces, objects,
                write_rank_file(str(tmp_path / "moved"), 0, moved, pieces, objects, layouts=layouts))
    fewer = pieces[1:]
    (tmp_path / "fewer").mkdir()
    records = write_rank_file(str(tmp_path / "fewer"), 0, moved, fewer, objects, layouts=layouts)
    assert {r.key for r in records} == {p.key for p in fewer} | set(objects)
    assert len(layouts) == 2  # the moved slot's layout, then replaced by the one for fewer pieces


@pytest.mark.parametrize("marked", ["every piece", "some pieces"])
@pytest.mark.parametrize("memory", ["staged", "from memory"])
def test_progress_comes_in_order_after_the_pieces_bytes_left_the_arrays(tmp_path, monkeypatch, marked, memory):
    """``progress(i)``: pieces ``0..i`` have left ``arrays`` (zero-copy snapshots overwrite a slot
    behind it). It comes with increasing ``i``, after pieces ``progress_points`` marks (every
    piece when None) or after a batch written, and for the last piece at the end; never for a
    piece that is neither. Overwriting the reported pieces at once must not change what the
    file holds. Staged pieces (every piece copied) are reported at once; a piece written from
    memory only once its batch is written."""
    if memory == "staged":
        monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1 << 40)
    elif not DirectFile(str(tmp_path / "probe")).direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT: no piece is written from memory")
    arrays, pieces, objects = _state()
    expected = {name: array.clone() for name, array in arrays.items()}
    points = None if marked == "every piece" else [i % 3 == 1 for i in range(len(pieces))]
    events = []
    flush = DirectFile.flush
    monkeypatch.setattr(DirectFile, "flush", lambda self: (events.append("batch") if self._queue else None,
                                                           flush(self))[1])

    def scribble(index):
        seen = [e for e in events if e != "batch"]
        first = seen[-1] + 1 if seen else 0
        events.append(index)
        for i in range(first, index + 1):
            piece = pieces[i]
            if all(p is piece or (p.array, p.start) != (piece.array, piece.start) for p in pieces[i + 1:]):
                piece.view(arrays).fill_(-1)  # no later piece shares these bytes: the slot may take them back

    layouts: dict = {}
    for version in range(2):
        for name in arrays:
            arrays[name].copy_(expected[name])
        events.clear()
        (tmp_path / str(version)).mkdir()
        records = write_rank_file(str(tmp_path / str(version)), 0, arrays, pieces, objects, progress=scribble,
                                  layouts=layouts, progress_points=points)
        seen = [e for e in events if e != "batch"]
        assert seen == sorted(set(seen)) and seen[-1] == len(pieces) - 1
        for at, event in enumerate(events):
            if event != "batch" and event != len(pieces) - 1 and points is not None and not points[event]:
                before = events[:at]
                last_report = max((j for j, e in enumerate(before) if e != "batch"), default=-1)
                assert "batch" in before[last_report + 1:], f"piece {event} reported, neither marked nor after a batch"
        if points is not None:
            assert 0 not in seen and len(seen) < len(pieces)
        if memory == "staged":  # nothing held: each marked piece reported as it is written
            assert set(seen) >= {i for i in range(len(pieces)) if points is None or points[i]}
        _check_file(tmp_path / str(version), expected, pieces, objects, records)


def test_a_staging_buffer_goes_to_the_next_file_and_brings_nothing_of_the_last(tmp_path):
    """A closed file gives its staging buffer back and the next file takes it (no page faults and
    unmapping per version); the next file's bytes are its own, its last block's padding included.
    A file aborted after an error gives its buffer up; a forked process starts with none (the
    fork hook, called here: this unit-tier module starts no process)."""
    with DirectFile(str(tmp_path / "long")) as f:
        stage = f._stage
        f.write(b"\xaa" * (3 * BLOCK + 17))
    with DirectFile(str(tmp_path / "short")) as f:
        assert f._stage is stage
        f.write(b"\x55" * 100)
    assert (tmp_path / "short").read_bytes() == b"\x55" * 100
    assert stage in direct_io._spare_stages
    kept, lock = list(direct_io._spare_stages), direct_io._spare_lock
    direct_io._forget_stages_after_fork()  # what a forked child runs (os.register_at_fork)
    assert direct_io._spare_stages == [] and direct_io._spare_lock is not lock, \
        "a forked process must not reuse its parent's staging buffers"
    direct_io._spare_stages[:] = kept
    failed = DirectFile(str(tmp_path / "failed"))
    assert failed._stage is stage
    failed.write(b"x")
    failed.abort()
    assert stage not in direct_io._spare_stages
    with DirectFile(str(tmp_path / "next")) as f:
        assert f._stage is not stage


def test_an_encoded_small_state_writes_the_bytes_the_objects_do(tmp_path):
    """A flusher encodes a request's small state once (``encode_item``) for its L0 description
    and its rank files: the rank file holds the same byte items, checksums included, as one
    written from the objects, and the description reads back the objects."""
    from checkpointing.format.writer import EncodedItem, encode_item
    from checkpointing.storage import host_pool
    from tests.helpers import synthetic_layout

    arrays, pieces, objects = _state()
    encoded = {name: encode_item(value) for name, value in objects.items()}
    assert all(isinstance(item, EncodedItem) for item in encoded.values())
    (tmp_path / "plain").mkdir()
    (tmp_path / "encoded").mkdir()
    plain = write_rank_file(str(tmp_path / "plain"), 0, arrays, pieces, objects)
    from_encoded = write_rank_file(str(tmp_path / "encoded"), 0, arrays, pieces, encoded)
    items = {r.key: r for r in plain if r.key in objects}
    assert {r.key: (r.length, r.checksum) for r in from_encoded if r.key in objects} == \
        {k: (r.length, r.checksum) for k, r in items.items()}
    _check_file(tmp_path / "encoded", arrays, pieces, objects, from_encoded)
    meta = tmp_path / "slot.meta"
    host_pool.write_description(str(meta), 5, encoded, synthetic_layout())
    described = host_pool.read_description(str(meta))
    assert set(described["objects"]) == set(objects) and described["objects"]["iteration"] == 7
    assert torch.equal(described["objects"]["rng"], objects["rng"])
    listed = host_pool.read_description(str(meta), decode_objects=False)  # what a listing reads: nothing decoded
    assert listed["version"] == 5 and "objects" not in listed
    assert listed[host_pool.OBJECT_BLOBS] == {name: item.blob for name, item in encoded.items()}
    with pytest.raises(ValueError, match=r"encoded whole or not at all.*\['plain'\]"):  # one would not be read back
        host_pool.description_blob(5, {**encoded, "plain": 1}, synthetic_layout())


def test_another_slots_layout_is_the_first_ones_moved(tmp_path, monkeypatch):
    """Pool slots are page-aligned mappings holding the arrays at the same offsets: the second
    slot's file follows the first slot's layout with its addresses moved (not worked out again),
    and its file holds its own bytes; arrays whose addresses differ otherwise get a layout of their own."""
    import mmap

    from checkpointing.format import writer

    arrays, pieces, objects = _state()
    nbytes = sum(t.nbytes for t in arrays.values())

    def slot(shift: int) -> dict:
        memory = mmap.mmap(-1, nbytes + 2 * BLOCK)
        flat, at, out = torch.frombuffer(memory, dtype=torch.uint8), shift, {}
        for name, t in arrays.items():
            out[name] = flat[at : at + t.nbytes].view(t.dtype)
            out[name].copy_(t * 2 if shift else t)
            at += -(-t.nbytes // BLOCK) * BLOCK
        return out

    made = []
    real_init = writer.RankFileLayout.__init__
    monkeypatch.setattr(writer.RankFileLayout, "__init__", lambda self, *a: made.append(1) or real_init(self, *a))
    layouts: dict = {}
    first, second, odd = slot(0), slot(0), slot(8)
    for name, values in (("first", first), ("second", second), ("odd", odd)):
        (tmp_path / name).mkdir()
        records = writer.write_rank_file_version(str(tmp_path / name), 0, values, pieces, objects,
                                                 layouts=layouts).records()
        _check_file(tmp_path / name, values, pieces, objects, records)
        assert len(made) == (1 if name != "odd" else 2), name
