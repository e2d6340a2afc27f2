"""The save plan (``checkpointing.format.save_plan``): a version's metadata filled from checksums (and
pickled from parts) decodes, field for field and in the same order, to the metadata built from
scratch, by stock pickle and by the restricted loader alike; the tiling check refuses overlaps and
gaps in N-d; a piece that changed is refused loudly. No processes."""

import dataclasses
import io
import pickle
import random

import pytest
import torch

from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.base.safe_pickle import load_dcp_metadata
from checkpointing.format.metadata import ChunkRecord, build_metadata
from checkpointing.format.rectangles import RectangleIndex, TilingError, check_tiling, overlap
from checkpointing.format.save_plan import SavePlan, SavePlanChangedError

LAYOUT = ParallelLayout(tensor_parallel=2, pipeline_parallel=1, data_parallel=2, distributed_optimizer=True,
                        num_layers=2, bf16=False)


def rank_records(rank: int, version: int, replicas: bool = False) -> list[ChunkRecord]:
    """Rank ``rank`` of a TP2xDP2 layout: a (8, 6) weight cut by TP into columns and by DP into
    rows, a (4,) norm written by TP rank 0, fp32 weight records sharing the main weights' bytes,
    and byte items whose length changes with the version."""
    tp, dp = rank % 2, rank // 2
    name = f"__{rank}_0.distcp"
    rng = random.Random(version * 100 + rank)
    out, at = [], 0
    pieces = [("w", (4 * dp, 3 * tp), (4, 3), (8, 6), True)]
    if tp == 0:
        pieces.append(("norm", (2 * dp,), (2,), (4,), True))
    elif replicas:
        pieces.append(("norm", (2 * dp,), (2,), (4,), False))
    for key, offsets, sizes, shape, writer in pieces:
        checksum = rng.getrandbits(64)
        for prefix in ("optimizer.state.fp32_param.", ""):  # the weight shares the main weights' bytes
            out.append(ChunkRecord(prefix + key, offsets, sizes, shape, torch.float32, name, at, 700, checksum, rank,
                                   writer))
        at += 700
    out.append(ChunkRecord(f"rng.{rank}", None, None, None, None, name, at, 90 + version % 7, rng.getrandbits(64), rank))
    if rank == 0:
        out.append(ChunkRecord("common", None, None, None, None, name, at + 200, 50 + version, rng.getrandbits(64), 0))
    return out


def assert_decodes_to(data: bytes, scratch) -> None:
    """``data`` (a ``.metadata``'s bytes) decodes to ``scratch``: every field, every key in its
    order, our facts; through stock pickle (as DCP's reader) and the restricted loader alike."""
    restricted, trusted = load_dcp_metadata(io.BytesIO(data), "test", False)
    assert not trusted  # nothing outside DCP's metadata classes was needed
    for decoded in (pickle.loads(data), restricted):
        assert type(decoded) is type(scratch)
        assert decoded == scratch  # state_dict_metadata, planner_data, storage_data, storage_meta, version
        assert decoded.__dict__.keys() == scratch.__dict__.keys()
        assert decoded.gpt_ckpt == scratch.gpt_ckpt
        assert list(decoded.storage_data.items()) == list(scratch.storage_data.items())
        assert list(decoded.state_dict_metadata) == list(scratch.state_dict_metadata)
        assert list(decoded.gpt_ckpt["checksums"].items()) == list(scratch.gpt_ckpt["checksums"].items())
        assert pickle.dumps(decoded.gpt_ckpt) == pickle.dumps(scratch.gpt_ckpt)


@pytest.mark.parametrize("replicas", [False, True], ids=["shared", "node-local"])
def test_filled_metadata_equals_the_one_built_from_scratch(replicas):
    ranks = [SavePlan() for _ in range(4)]
    coordinator = ranks[0]
    local_files = ["__0_0.distcp", "__1_0.distcp"] if replicas else None
    for version in range(1, 30):
        records = [rank_records(r, version, replicas) for r in range(4)]
        sent = [plan.rank.payload(rs) for plan, rs in zip(ranks, records)]
        if version > 1:  # the plan is built: 8 bytes a tensor chunk, no records but the byte items
            assert all(len(s.checksums) == 8 * sum(r.offsets is not None for r in rs) for s, rs in zip(sent, records))
        filled = coordinator.metadata(sent, version, LAYOUT, local_files)
        scratch = build_metadata([r for rs in records for r in rs], version, LAYOUT, local_files)
        assert_decodes_to(filled, scratch)  # version 1 too: built from scratch, pickled by the template it starts
        for plan in ranks:
            plan.committed()
    assert coordinator.template is not None


def test_a_moved_byte_range_is_sent_and_filled():
    """Rank 3's first chunk is padded differently from version 2 on (its memory's alignment): it is
    sent as a move at every such version, against the places of the template the coordinator
    fills, not those of the version before."""
    plans = [SavePlan() for _ in range(4)]
    for version in (1, 2, 3, 4):
        records = [rank_records(r, version) for r in range(4)]
        if version in (2, 3):
            records[3] = [dataclasses.replace(r, offset=r.offset + 4096) if r.offset == 0 else r for r in records[3]]
        sent = [p.rank.payload(rs) for p, rs in zip(plans, records)]
        filled = plans[0].metadata(sent, version, LAYOUT, None)
        assert_decodes_to(filled, build_metadata([r for rs in records for r in rs], version, LAYOUT))
        for p in plans:
            p.committed()
        if version > 1:
            assert bool(sent[3].moved) == (version in (2, 3)) and not sent[2].moved, version


def test_a_checked_layout_sends_its_checksums_without_making_records(tmp_path, monkeypatch):
    """A rank file written from a kept layout (``write_rank_file_version``): the plan checks the
    layout's records once, then sends each version's checksums without making them; each payload
    fills the metadata that the version's own records build, for two slots (layouts) in turn."""
    from checkpointing.format.items import TensorPiece
    from checkpointing.format.writer import RankFileLayout, write_rank_file_version

    torch.manual_seed(0)
    slots = [{"main": torch.randn(40_000)} for _ in range(2)]
    pieces = [TensorPiece("w", "main", 0, (100, 300), (100, 300), (0, 0)),
              TensorPiece("b", "main", 30_000, (5000,), (5000,), (0,)),
              TensorPiece("optimizer.state.fp32_param.w", "main", 0, (100, 300), (100, 300), (0, 0))]
    plan, layouts, made = SavePlan(), {}, []
    chunk_records = RankFileLayout.chunk_records
    monkeypatch.setattr(RankFileLayout, "chunk_records", lambda *a: made.append(1) or chunk_records(*a))
    for version in range(1, 9):
        arrays = slots[version % 2]
        arrays["main"].add_(1.0)
        (tmp_path / str(version)).mkdir()
        written = write_rank_file_version(str(tmp_path / str(version)), 0, arrays, pieces, {"iteration": version},
                                          layouts=layouts)
        made.clear()
        sent = plan.rank.payload_of(written)
        records = written.records()
        assert made == ([1] if version <= 3 else []) + [1], version  # records made: slot A's first two, slot B's first
        filled = plan.metadata([sent], version, LAYOUT, None)
        assert_decodes_to(filled, build_metadata(records, version, LAYOUT))
        assert written.nbytes == sum(length for _, length in {(r.offset, r.length) for r in records})
        plan.committed()


def test_a_changed_piece_is_refused():
    plan = SavePlan()
    plan.rank.payload(rank_records(1, 1))
    plan.committed()
    grown = [dataclasses.replace(r, sizes=(5, 3)) if r.key == "w" else r for r in rank_records(1, 2)]
    with pytest.raises(SavePlanChangedError, match=r"chunk 1 is w at \(0, 3\) of \(5, 3\).*restart the checkpoint engine"):
        plan.rank.payload(grown)
    with pytest.raises(SavePlanChangedError, match="writes 1 tensor chunks, its save plan 2"):
        plan.rank.payload(rank_records(1, 2)[1:])
    coordinator = SavePlan()
    first = [rank_records(r, 1) for r in range(4)]
    coordinator.metadata(first, 1, LAYOUT, None)
    coordinator.committed()
    with pytest.raises(SavePlanChangedError, match="sent no checksums"):
        coordinator.metadata(first, 2, LAYOUT, None)


def grid(shape, cuts):
    """Rectangles of ``shape`` cut at ``cuts`` (per dimension, inner boundaries)."""
    import itertools
    bounds = [[0, *c, n] for c, n in zip(cuts, shape)]
    rects = []
    for cell in itertools.product(*[list(zip(b, b[1:])) for b in bounds]):
        rects.append((tuple(lo for lo, _ in cell), tuple(hi - lo for lo, hi in cell)))
    return rects


def check(shape, rects):
    check_tiling("t", shape, [o for o, _ in rects], [s for _, s in rects], list(range(len(rects))))


@pytest.mark.parametrize("shape, cuts", [((10,), [(3, 7)]), ((6, 4), [(1, 5), (2,)]), ((2, 6, 4), [(1,), (3,), (1, 2)])])
def test_tiling_accepts_exact_covers_and_refuses_overlaps_and_gaps(shape, cuts):
    rects = grid(shape, cuts)
    random.Random(0).shuffle(rects)
    check(shape, rects)
    with pytest.raises(TilingError, match="cover"):  # a gap
        check(shape, rects[1:])
    (o, s) = rects[0]
    bigger = [(o, tuple(min(x + 1, n - oo) for x, oo, n in zip(s, o, shape)))] + rects[1:]
    if bigger[0] != rects[0]:
        with pytest.raises(TilingError, match="overlap"):
            check(shape, bigger)
    with pytest.raises(TilingError, match="overlap"):  # a duplicate
        check(shape, rects + [rects[-1]])
    with pytest.raises(TilingError, match="exceeds"):
        check(shape, [(tuple(n - x + 1 for x, n in zip(s, shape)), s)] + rects[1:])


@pytest.mark.parametrize("shape, cuts", [((10,), [(3, 7)]), ((6, 4), [(1, 5), (2,)])])
def test_one_nodes_part_may_leave_gaps_but_not_overlap(shape, cuts):
    """A node-local level's metadata describes its node's chunks only (``complete=False``)."""
    rects = grid(shape, cuts)
    part = rects[::2]
    check_tiling("t", shape, [o for o, _ in part], [s for _, s in part], list(range(len(part))), complete=False)
    with pytest.raises(TilingError, match="overlap"):
        check_tiling("t", shape, [o for o, _ in part + part[:1]], [s for _, s in part + part[:1]],
                     list(range(len(part) + 1)), complete=False)
    with pytest.raises(TilingError, match="cover"):  # the whole job's view must cover
        check(shape, part)


def test_a_nodes_filled_metadata_equals_its_own_build_and_the_whole_job_refuses_its_gaps():
    """Node 0 of the TP2xDP2 layout (ranks 0 and 1, one DP replica: rows 0-3 of ``w``) on a
    node-local level: its coordinator's records only, filled = built from scratch; the same
    records as a shared level's would be a gap."""
    plans = [SavePlan() for _ in range(2)]
    local_files = ["__0_0.distcp", "__1_0.distcp"]
    for version in range(1, 5):
        records = [rank_records(r, version, replicas=True) for r in range(2)]
        sent = [plan.rank.payload(rs) for plan, rs in zip(plans, records)]
        filled = plans[0].metadata(sent, version, LAYOUT, local_files)
        scratch = build_metadata([r for rs in records for r in rs], version, LAYOUT, local_files)
        assert_decodes_to(filled, scratch)
        assert sorted(c.offsets for c in pickle.loads(filled).state_dict_metadata["w"].chunks) == [(0, 0), (0, 3)]
        for plan in plans:
            plan.committed()
    with pytest.raises(TilingError, match="cover"):
        build_metadata([r for rs in records for r in rs], 4, LAYOUT, None)


def test_tiling_refuses_an_overlap_hidden_behind_a_gap_of_equal_volume():
    # volumes sum to the whole, but one cell is covered twice and another not at all
    rects = [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 3)), ((2, 2), (1, 1)), ((3, 3), (1, 1))]
    assert sum(s[0] * s[1] for _, s in rects) == 16
    with pytest.raises(TilingError, match="overlap"):
        check((4, 4), rects)
    # long column chunks (every row) beside row-cut ones: the sweep axis changes nothing
    columns = [((0, 0), (8, 1)), ((0, 1), (8, 1))] + [((r, 2), (1, 2)) for r in range(8)]
    check((8, 4), columns)
    with pytest.raises(TilingError, match="overlap"):
        check((8, 4), columns + [((7, 1), (1, 2))])


def test_index_finds_the_same_chunks_as_a_scan():
    rng = random.Random(1)
    rects = grid((40, 12), [sorted(rng.sample(range(1, 40), 9)), (3, 6, 9)])
    index = RectangleIndex([o for o, _ in rects], [s for _, s in rects])
    for _ in range(200):
        o = (rng.randrange(40), rng.randrange(12))
        s = (rng.randint(1, 40 - o[0]), rng.randint(1, 12 - o[1]))
        scan = [i for i, (ro, rs) in enumerate(rects) if overlap(o, s, ro, rs) is not None]
        assert index.overlapping(o, s) == scan


def test_versions_saved_through_a_plan_load_and_verify(single_process_group, tmp_path):
    """save_and_commit with a plan, one process: versions 2.. are filled from checksums; each
    loads with its checksums verified (DCP's own reader too), and its .metadata decodes to the one
    built from scratch."""
    import torch.distributed.checkpoint as dcp

    from checkpointing.base.levels import Level
    from checkpointing.format.commit import save_and_commit
    from checkpointing.format.items import TensorPiece
    from checkpointing.format.metadata import read_metadata
    from checkpointing.format.reader import CheckpointReader

    pieces = [TensorPiece("w", "a", 0, (3, 4), (3, 4), (0, 0)), TensorPiece("b", "a", 12, (5,), (5,), (0,)),
              TensorPiece("optimizer.state.exp_avg.w", "m", 0, (3, 4), (3, 4), (0, 0))]
    plan = SavePlan()
    level = Level("L2", str(tmp_path / "l2"), None, None)
    for version in (1, 2, 3):
        arrays = {"a": torch.arange(17, dtype=torch.float32) * version, "m": torch.full((17,), float(version))}
        assert (plan.template is None) == (version == 1)  # from the second version on: filled
        result = save_and_commit(level, version, arrays, pieces, {"common": {"iteration": version}}, LAYOUT,
                                 single_process_group, plan=plan)
        out = {"a": torch.zeros(17), "m": torch.zeros(17)}
        CheckpointReader(result.path).read_pieces(pieces, out)
        assert torch.equal(out["a"], arrays["a"]) and torch.equal(out["m"][:12], arrays["m"][:12])
        scratch = tmp_path / f"scratch{version}"
        save_and_commit(Level("L2", str(scratch), None, None), version, arrays, pieces,
                        {"common": {"iteration": version}}, LAYOUT, single_process_group)
        assert read_metadata(result.path).gpt_ckpt == read_metadata(str(scratch / f"iter_{version:07d}")).gpt_ckpt
        assert_decodes_to(open(f"{result.path}/.metadata", "rb").read(),
                          pickle.loads(open(scratch / f"iter_{version:07d}" / ".metadata", "rb").read()))
        stock = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}
        dcp.load(stock, storage_reader=dcp.FileSystemReader(result.path))
        assert torch.equal(stock["w"].reshape(-1), arrays["a"][:12]) and torch.equal(stock["b"], arrays["a"][12:])


def test_a_one_rank_save_agrees_without_collectives_and_still_fails_whole(single_process_group, tmp_path,
                                                                         monkeypatch):
    """A group of one agrees with itself: a single-process job's versions (every one: several
    agreements each) commit without a gloo collective, and an error still fails the save, named."""
    import torch.distributed as dist

    from checkpointing.base.agreement import any_rank, errors_from_all
    from checkpointing.base.durable import CheckpointWriteError
    from checkpointing.base.levels import Level
    from checkpointing.format.commit import save_and_commit
    from checkpointing.format.items import TensorPiece

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in a group of one")

    for name in ("all_reduce", "all_gather_object", "gather_object", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, no_collective)
    assert any_rank(single_process_group, True) and not any_rank(single_process_group, False)
    assert errors_from_all(single_process_group, None) == [] and errors_from_all(single_process_group, "x") == ["x"]
    pieces = [TensorPiece("w", "a", 0, (3, 4), (3, 4), (0, 0))]
    plan = SavePlan()
    for version in (1, 2):
        result = save_and_commit(Level("L2", str(tmp_path / "l2"), None, None), version,
                                 {"a": torch.arange(12, dtype=torch.float32)}, pieces, {"common": {"v": version}},
                                 LAYOUT, single_process_group, plan=plan)
        assert (tmp_path / "l2" / f"iter_{version:07d}" / ".metadata").is_file(), result
    (tmp_path / "blocked").write_text("a file where the level's directory goes")
    with pytest.raises(CheckpointWriteError, match="rank 0: cannot create"):
        save_and_commit(Level("L2", str(tmp_path / "blocked"), None, None), 3, {"a": torch.zeros(12)}, pieces,
                        {"common": {}}, LAYOUT, single_process_group)
