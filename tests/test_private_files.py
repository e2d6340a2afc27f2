"""Files other users can plant are refused, never read or run: the L0 pool's directory and slots,
slot descriptions and a checkpoint's pickles. Another user's files are made with ``chown`` (the
suite runs as root in CI; without root those tests skip)."""

import io
import os
import pickle
import sys

import pytest
import torch

from checkpointing.base import private_files
from checkpointing.base.errors import CheckpointError, CheckpointUntrustedError
from checkpointing.base.safe_pickle import load_dcp_metadata, load_objects
from checkpointing.storage import host_pool
from checkpointing.storage.host_pool import ArraySpec, HostPool, HostSlot
from tests.helpers import PickleMarker, synthetic_layout

NOBODY = 65534
SPECS = {"a": ArraySpec(1024, torch.float32)}
as_root = pytest.mark.skipif(os.getuid() != 0, reason="making a file another user's needs root (chown)")


def _foreign(path, mode=0o666):
    os.chmod(path, mode)
    os.chown(path, NOBODY, NOBODY)


def test_the_pool_directory_is_private(tmp_path):
    directory, note = private_files.pool_dir(str(tmp_path))
    assert note is None and directory == str(tmp_path / f"gptckpt-{os.getuid()}")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    slot = HostSlot(os.path.join(directory, "gptckpt-job-r0-s0"), SPECS)
    slot.describe(3, {"common": {"iteration": 3}}, synthetic_layout())
    for path in (slot.path, slot.meta_path):
        assert os.stat(path).st_mode & 0o777 == 0o600, path
    assert private_files.pool_dir(str(tmp_path)) == (directory, None)  # reused when it passes the checks


@as_root
def test_a_directory_another_user_made_first_is_not_used(tmp_path):
    planted = tmp_path / f"gptckpt-{os.getuid()}"
    planted.mkdir()
    (planted / "gptckpt-job-r0-s0.meta").write_bytes(pickle.dumps(PickleMarker(tmp_path / "marker")))
    _foreign(planted, 0o777)
    pool = HostPool("job", 0, SPECS, 1, None, str(tmp_path))
    assert pool.directory != str(planted) and os.stat(pool.directory).st_uid == os.getuid()
    assert any(f"{planted} refused: it is owned by uid {NOBODY}" in n for n in pool.notes), pool.notes
    assert pool.slots[0].version is None and not (tmp_path / "marker").exists()
    assert host_pool.list_segments(directory=str(tmp_path)) == [pool.slots[0].path]


def test_a_link_to_the_pool_directory_is_not_used(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, tmp_path / f"gptckpt-{os.getuid()}")
    directory, note = private_files.pool_dir(str(tmp_path))
    assert "is a symbolic link" in note and directory != str(tmp_path / f"gptckpt-{os.getuid()}")
    assert os.listdir(elsewhere) == []


@as_root
def test_planted_slot_files_are_set_aside_unread(tmp_path):
    """Inside this user's directory: a slot and a description of another owner, and a symlink in
    place of a slot, are moved aside (nothing deleted) and the slot starts empty."""
    directory, _ = private_files.pool_dir(str(tmp_path))
    slot_path = os.path.join(directory, "gptckpt-job-r0-s0")
    with open(slot_path, "wb") as f:
        f.write(b"\0" * 4096)
    with open(slot_path + ".meta", "wb") as f:
        pickle.dump(PickleMarker(tmp_path / "marker"), f)
    _foreign(slot_path)
    _foreign(slot_path + ".meta")
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    link = os.path.join(directory, "gptckpt-job-r0-s1")
    os.symlink(target, link)
    notes: list[str] = []
    first, second = HostSlot(slot_path, SPECS, notes), HostSlot(link, SPECS, notes)
    assert first.version is None and second.version is None
    assert not (tmp_path / "marker").exists() and target.read_bytes() == b"precious"
    assert sum("refused" in n and "moved to" in n for n in notes) == 3, notes
    assert any("symbolic link" in n for n in notes) and any(f"owned by uid {NOBODY}" in n for n in notes)
    assert os.path.exists(slot_path + ".refused-" + str(os.getpid()))
    assert os.stat(first.path).st_uid == os.getuid() and not os.path.islink(second.path)


def test_a_description_that_would_run_code_is_not_recovered(tmp_path):
    """Even this user's own file: a description is data, read with ``weights_only``."""
    directory, _ = private_files.pool_dir(str(tmp_path))
    slot = HostSlot(os.path.join(directory, "gptckpt-job-r0-s0"), SPECS)
    slot.describe(5, {"common": {"iteration": 5}}, synthetic_layout())
    assert HostSlot(slot.path, SPECS).version == 5  # a real description is recovered
    planted = pickle.dumps({"version": 7, "objects": PickleMarker(tmp_path / "marker"), "layout": {}})
    with open(slot.meta_path, "wb") as f:  # framed with a valid checksum: the planter knows the format
        f.write(host_pool.framed_description(planted))
    notes: list[str] = []
    assert HostSlot(slot.path, SPECS, notes).version is None
    assert not (tmp_path / "marker").exists()
    assert any("not recovered" in n and "full unpickling" in n for n in notes), notes


def test_a_flipped_bit_in_a_description_is_found_before_it_is_decoded(tmp_path):
    """Seeded fuzz: every single-bit flip of a slot's description is refused as damaged (before,
    most flips were read back silently, changing RNG states or where a tensor lies)."""
    import random

    directory, _ = private_files.pool_dir(str(tmp_path))
    slot = HostSlot(os.path.join(directory, "gptckpt-job-r0-s0"), SPECS)
    slot.describe(5, {"common": {"iteration": 5}, "rng": torch.get_rng_state()}, synthetic_layout())
    pristine = open(slot.meta_path, "rb").read()
    for bit in random.Random(20261207).sample(range(8 * len(pristine)), 300):
        flipped = bytearray(pristine)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with open(slot.meta_path, "wb") as f:
            f.write(flipped)
        with pytest.raises(CheckpointError, match="checksum"):
            host_pool.read_description(slot.meta_path)
    with open(slot.meta_path, "wb") as f:
        f.write(pristine)
    assert host_pool.read_description(slot.meta_path)["version"] == 5


def test_a_flushers_description_reads_without_torch_and_anything_else_is_left_to_host_pool(tmp_path):
    """``rollback.sh --list`` reads each slot's version without importing torch
    (``description_file.read_plain_description``): a flusher's description (small state as byte
    items, pieces and arrays encoded) reads to the same fields as ``host_pool``'s reader gives.
    An older description with a tensor in its small state, or a pickle naming anything but
    ``_codecs.encode``, is not read here (``NeedsTorchError``; nothing of it runs); a damaged one
    is refused by its checksum, a link is not followed."""
    from checkpointing.format.items import TensorPiece
    from checkpointing.format.writer import encode_item
    from checkpointing.storage import description_file

    directory, _ = private_files.pool_dir(str(tmp_path))
    meta = os.path.join(directory, "gptckpt-job-r0-s0.meta")
    small = {"common": encode_item({"iteration": 5, "args": {"lr": 1e-3}}), "rng": encode_item(torch.get_rng_state())}
    pieces = [TensorPiece("w", "a", 0, (2, 3), (4, 3), (2, 0))]
    host_pool.write_description(meta, 5, small, synthetic_layout(), host_pool.encode_pieces(pieces), SPECS)
    plain = description_file.read_plain_description(meta)
    assert plain == host_pool.read_description(meta, decode_objects=False)
    assert plain["version"] == 5 and isinstance(plain[host_pool.OBJECT_BLOBS]["rng"], bytes)

    os.unlink(meta)
    host_pool.write_description(meta, 6, {"rng": torch.get_rng_state()}, synthetic_layout())  # objects, a tensor
    with pytest.raises(description_file.NeedsTorchError, match="tensor"):
        description_file.read_plain_description(meta)
    assert host_pool.read_description(meta)["version"] == 6
    planted = io.BytesIO()  # a torch.save archive whose pickle would run code: its global is refused, not looked up
    torch.save({"version": 7, "layout": {}, "objects": PickleMarker(tmp_path / "marker")}, planted)
    with open(meta, "wb") as f:
        f.write(host_pool.framed_description(planted.getvalue()))
    with pytest.raises(description_file.NeedsTorchError, match="names io.open"):
        description_file.read_plain_description(meta)
    assert not (tmp_path / "marker").exists()
    with open(meta, "wb") as f:
        f.write(host_pool.framed_description(pickle.dumps({"version": 7, "layout": {}})))  # not an archive
    with pytest.raises(CheckpointError, match="not a torch.save archive"):
        description_file.read_plain_description(meta)
    flipped = bytearray(open(meta, "rb").read())
    flipped[-3] ^= 1
    with open(meta, "wb") as f:
        f.write(flipped)
    with pytest.raises(CheckpointError, match="checksum"):
        description_file.read_plain_description(meta)
    os.unlink(meta)
    assert description_file.read_plain_description(meta) is None
    os.symlink(str(tmp_path / "elsewhere"), meta)
    with pytest.raises(private_files.UnsafePathError):
        description_file.read_plain_description(meta)


def test_rng_states_and_arguments_load_without_full_unpickling():
    import random

    import numpy as np

    blob = io.BytesIO()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "args": {"lr": {"lr": 1e-3}, "name": "x", "dims": (1, 2)}}, blob)
    value, trusted = load_objects(blob.getvalue(), "test item")
    assert not trusted and value["args"]["dims"] == (1, 2)
    np.random.set_state(value["numpy"])


def test_a_checkpoint_pickle_naming_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "marker"
    saved = io.BytesIO()
    torch.save({"common": PickleMarker(marker)}, saved)  # a byte item as the writer frames it
    blob = saved.getvalue()
    with pytest.raises(CheckpointUntrustedError, match="--trust-checkpoint-pickles"):
        load_objects(blob, "item common")
    assert not marker.exists()
    with pytest.raises(CheckpointUntrustedError, match="names io.open.*nothing in it was run"):
        load_dcp_metadata(io.BytesIO(pickle.dumps({"metadata": PickleMarker(marker)})), ".metadata")
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"n": 1}, plain)
    value, trusted = load_objects(plain.getvalue(), "item")  # plain data needs no trust
    assert value == {"n": 1} and not trusted
    value, trusted = load_objects(blob, "item common", trust=True)  # vouched for: read (and run)
    assert trusted and marker.exists()


def test_host_pool_list_names_a_refused_directory(tmp_path, capsys):
    os.symlink(tmp_path, tmp_path / f"gptckpt-{os.getuid()}")
    assert host_pool.main(["--ckpt-host-dir", str(tmp_path)]) == 0
    assert "refused: it is a symbolic link" in capsys.readouterr().out


class _ViaGetattr:
    """Pickles as ``getattr(owner, name)``: how Python 3.11.0-3.11.4 pickle an enum member."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_enum_members_pickled_through_getattr_load_and_nothing_else_does():
    """Debian 12's Python 3.11.2 writes DCP's ``_MEM_FORMAT_ENCODING`` members as
    ``builtins.getattr(cls, name)``: admitted for members of DCP's enums, refused for anything else."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    blob = pickle.dumps(_ViaGetattr(_MEM_FORMAT_ENCODING, member.name), protocol=5)
    assert b"getattr" in blob
    assert load_dcp_metadata(io.BytesIO(blob), ".metadata") == (member, False)
    for owner, name in ((_MEM_FORMAT_ENCODING, "__class__"), (_MEM_FORMAT_ENCODING, "_missing_"),
                        (Metadata, "__init__"), (torch.float32, "to")):
        with pytest.raises(CheckpointUntrustedError, match="getattr"):
            load_dcp_metadata(io.BytesIO(pickle.dumps(_ViaGetattr(owner, name), protocol=5)), ".metadata")


def test_metadata_this_python_writes_is_read_back_without_trust(tmp_path):
    """The round trip that Python 3.11.2 broke: run this module under /usr/bin/python3.11 too
    (scripts/run_tests.sh does where it differs from the venv's)."""
    import sys

    from checkpointing.format.metadata import ChunkRecord, build_metadata, read_metadata, write_metadata

    record = ChunkRecord("w", (0,), (4,), (4,), torch.float32, "__0_0.distcp", 0, 64, 7, 0)
    write_metadata(str(tmp_path), build_metadata([record], 3, synthetic_layout()))
    metadata = read_metadata(str(tmp_path))
    assert metadata.gpt_ckpt["iteration"] == 3 and not metadata.gpt_ckpt_full_unpickling, sys.version


def test_a_pool_parent_others_can_rename_in_is_refused(tmp_path):
    """Another user who can rename entries of --ckpt-host-dir could move the pool aside."""
    base = tmp_path / "host"
    base.mkdir()
    os.chmod(base, 0o777)
    with pytest.raises(private_files.UnsafePathError, match="no sticky bit"):
        private_files.pool_dir(str(base))
    os.chmod(base, 0o1777)  # as /dev/shm
    assert private_files.pool_dir(str(base)) == (str(base / f"gptckpt-{os.getuid()}"), None)


@as_root
def test_a_pool_parent_of_another_user_is_refused(tmp_path):
    base = tmp_path / "host"
    base.mkdir()
    os.chown(base, NOBODY, NOBODY)
    with pytest.raises(private_files.UnsafePathError, match=f"owned by uid {NOBODY}"):
        private_files.pool_dir(str(base))


def test_a_descriptions_pieces_are_encoded_once_and_read_as_data(tmp_path):
    """A flusher encodes its pieces once (``encode_pieces``); a description holding them decodes
    to the same pieces, as one holding the older list of fields does; pieces that would run code
    are refused, naming the description."""
    from checkpointing.format.items import TensorPiece

    pieces = [TensorPiece("w", "main", 0, (2, 3), (4, 3), (2, 0)), TensorPiece("b", "main", 6, (3,), (3,), (0,), False)]
    encoded = host_pool.encode_pieces(pieces)
    blob = host_pool.description_blob(5, {}, synthetic_layout(), encoded)
    description, _ = load_objects(blob, "test")
    assert host_pool.decode_pieces(description["pieces"], "d") == pieces
    assert description == load_objects(host_pool.description_blob(5, {}, synthetic_layout(), pieces), "test")[0]
    assert host_pool.decode_pieces([host_pool.encode_piece(p) for p in pieces], "d") == pieces
    with pytest.raises(CheckpointError, match="the pieces of planted-description"):
        host_pool.decode_pieces(pickle.dumps([PickleMarker(tmp_path / "marker")]), "planted-description")
    assert not (tmp_path / "marker").exists()


class _CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_a_protocol_2_metadata_names_builtins_as_python_2_did_and_is_checked_the_same():
    """A level's later ``.metadata`` is pickled at protocol 2 (``metadata_encoding``), where builtins
    are named ``__builtin__``: the restricted loader maps the name first, so ``getattr`` of an enum
    member still loads (Python 3.11.2 pickles enums so) and anything else of builtins is refused."""
    data = pickle.dumps(_CallsEval(), protocol=2)
    assert b"c__builtin__\neval\n" in data
    with pytest.raises(CheckpointUntrustedError, match=r"builtins\.eval"):
        load_dcp_metadata(io.BytesIO(data), "planted", False)


def test_the_inert_reader_stands_in_only_for_what_the_strict_one_admits(tmp_path):
    """``load_dcp_metadata(inert=True)`` (``rollback.sh``'s reader, without torch) refuses what the
    strict reader refuses, sends what it has no stand-in for to the strict reader, and stands in
    only for globals the strict reader admits."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata

    from checkpointing.base.safe_pickle import (
        _INERT_CLASSES,
        INERT_DTYPES,
        INERT_ENUM_MEMBERS,
        InertRecord,
        _allowed_dcp_global,
    )

    for module, names in _INERT_CLASSES.items():
        assert names and all(_allowed_dcp_global(module, name) for name in names), module
    assert all(_allowed_dcp_global("torch", name) for name in INERT_DTYPES)
    assert INERT_ENUM_MEMBERS == {(_MEM_FORMAT_ENCODING.__module__, _MEM_FORMAT_ENCODING.__qualname__):
                                  set(_MEM_FORMAT_ENCODING.__members__)}
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointUntrustedError, match="names io.open.*nothing in it was run"):
        load_dcp_metadata(io.BytesIO(pickle.dumps({"m": PickleMarker(marker)})), ".metadata", inert=True)
    with pytest.raises(CheckpointUntrustedError, match=r"builtins\.eval"):
        load_dcp_metadata(io.BytesIO(pickle.dumps(_CallsEval(), protocol=2)), "planted", inert=True)
    assert not marker.exists()
    for owner, name in ((_MEM_FORMAT_ENCODING, "__class__"), (Metadata, "TORCH_CONTIGUOUS_FORMAT"),
                        (torch.Size, "__new__")):  # as the strict reader: getattr of an enum member only
        with pytest.raises(CheckpointUntrustedError, match="getattr"):
            load_dcp_metadata(io.BytesIO(pickle.dumps(_ViaGetattr(owner, name), protocol=5)), ".metadata", inert=True)
    # Python 3.11.0-3.11.4 pickle a member through getattr: a stand-in too.
    member = load_dcp_metadata(io.BytesIO(pickle.dumps(_ViaGetattr(_MEM_FORMAT_ENCODING, "TORCH_CHANNELS_LAST"))),
                               ".metadata", inert=True)[0]
    assert isinstance(member, InertRecord) and member.args == ("TORCH_CHANNELS_LAST",)
    # A dtype with no stand-in: read strict.
    assert load_dcp_metadata(io.BytesIO(pickle.dumps([torch.float8_e5m2fnuz])), ".metadata", inert=True) == \
        ([torch.float8_e5m2fnuz], False)
    size, dtype = load_dcp_metadata(io.BytesIO(pickle.dumps([torch.Size([2, 3]), torch.bfloat16])), ".metadata",
                                    inert=True)[0]
    assert type(size) is tuple and size == (2, 3) and dtype == "torch.bfloat16"
    member = _MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT
    stand_in, _ = load_dcp_metadata(io.BytesIO(pickle.dumps(member)), ".metadata", inert=True)
    if sys.version_info >= (3, 11, 5):  # earlier: pickled through getattr, read strict (above)
        assert isinstance(stand_in, InertRecord) and stand_in.args == (member.value,)
