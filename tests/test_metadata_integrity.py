"""A committed ``.metadata`` is verified before it is decoded: its bytes carry a checksum
(``.metadata.xxh3``), any flipped bit makes the checkpoint *damaged* and the loader falls back to
the previous one; a ``.metadata`` without a checksum file (older, or written by another tool) is
scanned before it is unpickled, and whatever decoding it raises is damage too. Seeded bit-flip
fuzz, every outcome classified."""

import os
import random
import shutil

import pytest

from checkpointing.base.errors import CheckpointCorruptError, CheckpointUntrustedError
from checkpointing.format.metadata import METADATA_CHECKSUM_NAME, METADATA_NAME, read_metadata
from checkpointing.recovery.inventory import check_directory
from tests.test_load_policy import _loader, _save

FLIPS = 300
SEED = 20261207


def _flip(path, bit):
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        byte = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([byte ^ (1 << (bit % 8))]))


@pytest.fixture
def two_versions(tmp_path, single_process_group):
    """iter_4 and iter_8 committed in ``--save``; returns (loader, logs, newest directory)."""
    logs = []
    loader, state = _loader(tmp_path, single_process_group, logs)
    _save(tmp_path / "shared", 4, state, state.layout, single_process_group)
    newest = _save(tmp_path / "shared", 8, state, state.layout, single_process_group)
    return loader, logs, newest


def test_every_flipped_bit_of_a_checksummed_metadata_is_damage(two_versions):
    _, _, newest = two_versions
    path = os.path.join(newest, METADATA_NAME)
    pristine = open(path, "rb").read()
    bits = random.Random(SEED).sample(range(8 * len(pristine)), min(FLIPS, 8 * len(pristine)))
    for bit in bits:
        _flip(path, bit)
        with pytest.raises(CheckpointCorruptError, match="do not match their checksum"):
            read_metadata(newest)
        _flip(path, bit)
    assert read_metadata(newest).gpt_ckpt_verified


def test_a_flipped_metadata_is_passed_over_for_the_previous_version(two_versions):
    loader, logs, newest = two_versions
    _flip(os.path.join(newest, METADATA_NAME), 8 * 40 + 3)
    state, _ = check_directory(newest, verify=True)
    assert state == "corrupt"  # rollback.sh --list --verify says so too
    iteration, _ = loader.load()
    assert iteration == 4
    assert any("iter_0000008 is damaged" in line and "checksum" in line for line in logs), logs


def test_a_damaged_checksum_file_is_damage_not_a_crash(two_versions):
    _, _, newest = two_versions
    for content in (b"", b"xxh3-64 zz 12\n", b"x" * 10_000, b"xxh3-64 0123456789abcdef 99999999999999999999\n"):
        with open(os.path.join(newest, METADATA_CHECKSUM_NAME), "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointCorruptError):
            read_metadata(newest)


def test_a_directory_named_for_another_iteration_is_damage(two_versions, tmp_path):
    _, _, newest = two_versions
    renamed = tmp_path / "shared" / "iter_0000020"
    shutil.copytree(newest, renamed)
    with pytest.raises(CheckpointCorruptError, match="says iteration 8, its directory iter_0000020"):
        read_metadata(str(renamed))


@pytest.mark.parametrize("inert", [False, True], ids=["strict", "inert"])
def test_flips_of_an_unchecksummed_metadata_are_classified_and_never_crash(two_versions, inert):
    """Without the checksum file a flip may still decode (to the same or another object), or be
    refused as code; it must never raise anything else, nor allocate beyond the file (the
    memo-index flip that asked for 23 GiB is refused by the scan). The same for the inert
    reader (``rollback.sh``'s, without torch)."""
    _, _, newest = two_versions
    os.unlink(os.path.join(newest, METADATA_CHECKSUM_NAME))
    path = os.path.join(newest, METADATA_NAME)
    pristine = open(path, "rb").read()
    outcomes = {"decoded": 0, "damaged": 0, "refused": 0}
    for bit in random.Random(SEED + 1).sample(range(8 * len(pristine)), min(FLIPS, 8 * len(pristine))):
        _flip(path, bit)
        try:
            assert not read_metadata(newest, inert=inert).gpt_ckpt_verified
            outcomes["decoded"] += 1
        except CheckpointCorruptError:
            outcomes["damaged"] += 1
        except CheckpointUntrustedError:
            outcomes["refused"] += 1
        _flip(path, bit)
    assert sum(outcomes.values()) == min(FLIPS, 8 * len(pristine)) and outcomes["damaged"] > 0, outcomes


def test_the_inert_reading_holds_the_strict_readings_places_sizes_and_facts(two_versions):
    """What ``rollback.sh`` reads without torch (``read_metadata(inert=True)``) is what the loader
    reads: every chunk's key and place, every tensor's size and chunks, our facts."""
    from checkpointing.base.safe_pickle import InertRecord

    _, _, newest = two_versions
    strict, inert = read_metadata(newest), read_metadata(newest, inert=True)
    assert isinstance(inert, InertRecord) and type(inert).__name__ == "Metadata"
    assert inert.gpt_ckpt == strict.gpt_ckpt and inert.gpt_ckpt_verified

    def places(metadata):
        return sorted(((k.fqn, None if getattr(k, "offset", None) is None else tuple(k.offset), k.index),
                       (v.relative_path, v.offset, v.length)) for k, v in metadata.storage_data.items())

    assert places(inert) == places(strict) and len(places(strict)) > 1
    for key, entry in strict.state_dict_metadata.items():
        if hasattr(entry, "size"):
            stand_in = inert.state_dict_metadata[key]
            assert stand_in.size == tuple(entry.size), key
            assert [(c.offsets, c.sizes) for c in stand_in.chunks] == [(tuple(c.offsets), tuple(c.sizes))
                                                                        for c in entry.chunks], key
    assert inert.state_dict_metadata.keys() == strict.state_dict_metadata.keys()


def test_a_memo_index_past_the_pickle_is_refused_before_it_is_allocated(two_versions):
    """The flip the red team found: ``BINPUT`` (``q``, one-byte index) read as ``LONG_BINPUT``
    (``r``, four-byte index) makes the unpickler grow its memo to that index."""
    _, _, newest = two_versions
    os.unlink(os.path.join(newest, METADATA_CHECKSUM_NAME))
    path = os.path.join(newest, METADATA_NAME)
    data = bytearray(open(path, "rb").read())
    at = data.index(b"\x94")  # MEMOIZE (protocol 4+) is what HIGHEST_PROTOCOL writes; make one a LONG_BINPUT
    data[at:at + 1] = b"r\xff\xff\xff\x7f"
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointCorruptError, match="memo index 2147483647"):
        read_metadata(newest)


@pytest.mark.parametrize("tracker", [b"abc\n", b"-5\n", b"", b"\xff\xfe", "directory"])
def test_a_damaged_tracker_is_a_lost_hint_not_a_stop(two_versions, tmp_path, tracker):
    from checkpointing.base.durable import TRACKER_NAME
    from checkpointing.format.discovery import load_candidates

    loader, logs, _ = two_versions
    path = tmp_path / "shared" / TRACKER_NAME
    path.unlink()
    if tracker == "directory":
        path.mkdir()
    else:
        path.write_bytes(tracker)
    candidates, notes = load_candidates(str(tmp_path / "shared"))
    assert [c.iteration for c in candidates] == [8, 4] and any("tracker" in n and "damaged" in n for n in notes)
    assert loader.load()[0] == 8
