"""Checkpointing at 1k-16k ranks, simulated: the coordinator's and the loader's work, measured.

No processes and no tensors: for a model shape and a TP/PP/DP layout this produces, for every
rank, exactly the pieces it would write, with the trainer's own functions
(``trainer.flat_buffers.layout_spans``, ``trainer.optimizer.dp_ranges``/``rank_shards``,
``trainer.optimizer_pieces.shard_pieces``, ``trainer.checkpoint_state.checkpoint_pieces``) over
the parameter table of ``benchmarks.scale_model``, and the chunk records ``write_rank_file``
would return for them (byte ranges from the writer's own framing, no ``O_DIRECT`` padding;
checksums drawn at random). It then measures, per checkpoint version:

- the bytes each rank sends the coordinator (the pickled object it gathers);
- the coordinator's time to build the metadata and to write it (``write_metadata``), its size;
- a rank's time to read the ``.metadata`` and plan a load into another layout.

``before``: the metadata built from every rank's records at every version, the tiling checked
by comparing every pair of chunks of a key (the code as it was, kept here as the reference), a
load planned by scanning every chunk of a key. ``after``: the save plan
(``checkpointing.format.save_plan``: built and checked once, then checksums only), the sweep tiling
check, the indexed load plan (``checkpointing.format.load_plan``).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from benchmarks.scale_model import model_config, stage_params
from checkpointing.base import ParallelLayout
from checkpointing.format import (
    ChunkIndex,
    ChunkRecord,
    SavePlan,
    TensorPiece,
    TilingError,
    build_metadata,
    data_file_name,
    keys,
    overlap,
    read_metadata,
    tensor_chunk_length,
    wanted_chunks,
    write_metadata,
)
from models.config import GPTModelConfig
from trainer.checkpoint_state import checkpoint_pieces
from trainer.flat_buffers import RowGeometry, layout_spans
from trainer.optimizer import dp_ranges, rank_shards
from trainer.optimizer_pieces import shard_pieces
from trainer.parallel_dims import ParallelDims

RNG_ITEM_BYTES = 11_000
"""A rank's RNG byte item (python, numpy, torch and tracker states, ``torch.save``d): about this."""
COMMON_ITEM_BYTES = 6_000
"""Rank 0's ``common`` item (iteration, counters, the run's arguments)."""


@dataclass(frozen=True)
class Layout:
    """A TP x PP x DP layout of the simulated job."""

    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline-parallel degree."""
    dp: int
    """Data-parallel degree."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}"


@dataclass(frozen=True)
class ScaleCase:
    """One row of the table: a model saved in one layout and loaded into another."""

    name: str
    """Row label, e.g. ``70B@4096``."""
    model: str
    """A preset of ``models.config`` or a shape of ``benchmarks.scale_model.EXTRA_SHAPES``."""
    save: Layout
    """The layout that saves."""
    load: Layout
    """The layout a rank plans its load into."""
    shard_size_mb: float = 64.0
    """``--optimizer-shard-size-mb``."""
    bf16: bool = True
    """bf16 weights (their cast copy is a record of its own beside the fp32 main weights)."""


CASES = (
    ScaleCase("1.3B@64", "1.3B", Layout(2, 2, 16), Layout(2, 1, 32)),
    ScaleCase("7B@1024", "7B", Layout(8, 4, 32), Layout(8, 2, 64)),
    ScaleCase("70B@4096", "llama3-70B", Layout(8, 8, 64), Layout(8, 4, 128)),
    # 126 layers: with 16,384 = 2^14 ranks and TP8 (8 KV heads) the even pipeline split is PP2
    ScaleCase("405B@16384", "llama3-405B", Layout(8, 2, 1024), Layout(4, 2, 2048)),
    # Many chunks per key (--optimizer-shard-size-mb 1): what the tiling check and the load plan
    # meet when shards are small, or when a format cuts every parameter over every DP rank
    ScaleCase("70B@4096-1MB", "llama3-70B", Layout(8, 8, 64), Layout(8, 4, 128), shard_size_mb=1.0),
)


class Simulated:
    """Every rank's pieces of one model in one layout, cut by the trainer's functions."""

    def __init__(self, cfg: GPTModelConfig, layout: Layout, shard_size_mb: float, bf16: bool,
                 distributed_optimizer: bool = True):
        self.cfg, self.layout, self.shard_size_mb, self.bf16 = cfg, layout, shard_size_mb, bf16
        self.dims = ParallelDims(world_size=layout.world, tensor_parallel=layout.tp, pipeline_parallel=layout.pp)
        self.distributed = distributed_optimizer and layout.dp > 1

    @lru_cache(maxsize=None)
    def stage(self, tp_rank: int, pp_rank: int):
        """(geometry, specs, every DP rank's range) of one (TP, PP) rank: the same for its DP ranks."""
        params = stage_params(self.cfg, self.layout.tp, self.layout.pp, tp_rank, pp_rank)
        geometry = RowGeometry(layout_spans([p.facts for p in params]))
        specs = {p.facts.name: p.spec for p in params}
        return geometry, specs, dp_ranges(geometry, self.distributed, self.layout.dp)

    def optimizer_pieces(self, rank: int) -> list[TensorPiece]:
        """What ``optimizer_state_pieces`` returns on a global rank."""
        tp_rank, dp_rank, pp_rank = self.dims.coordinates(rank)
        geometry, specs, ranges = self.stage(tp_rank, pp_rank)
        shards = rank_shards(geometry, ranges, dp_rank if self.distributed else 0, self.shard_size_mb)
        start = ranges[dp_rank if self.distributed else 0][0]
        return shard_pieces(geometry, shards, start, self.distributed, specs, dp_rank)

    def pieces(self, rank: int) -> tuple[list[TensorPiece], list[TensorPiece]]:
        """(save pieces, load pieces) of a global rank, as ``TrainerCheckpointState`` makes them."""
        tp_rank, _, pp_rank = self.dims.coordinates(rank)
        geometry, specs, _ = self.stage(tp_rank, pp_rank)
        return checkpoint_pieces(self.optimizer_pieces(rank), geometry.spans, specs, self.cfg.vocab_size, self.bf16)

    def records(self, rank: int, version: int, replicas: bool = False) -> list[ChunkRecord]:
        """What ``write_rank_file`` returns on ``rank``: for a shared level (writer pieces only),
        or with ``replicas`` for a node-local one (every piece; the others' as replica records)."""
        save, _ = self.pieces(rank)
        name = data_file_name(rank)
        dtypes = {"fp32_param": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                  "param": torch.bfloat16 if self.bf16 else torch.float32}
        written: dict[tuple, tuple[int, int, int]] = {}
        out: list[ChunkRecord] = []
        at = 0
        for i, piece in enumerate(save):
            if not (piece.is_writer or replicas):
                continue
            same = (piece.array, piece.start, piece.shape)
            if same not in written:
                length = tensor_chunk_length(dtypes[piece.array], piece.shape)
                written[same] = (at, length, _checksum(version, rank, i))
                at += length
            offset, length, checksum = written[same]
            out.append(ChunkRecord(piece.key, piece.global_offset, piece.shape, piece.global_shape,
                                   dtypes[piece.array], name, offset, length, checksum, rank, piece.is_writer))
        items = [(keys.rng_key(rank), RNG_ITEM_BYTES)] + ([(keys.COMMON, COMMON_ITEM_BYTES)] if rank == 0 else [])
        for i, (key, length) in enumerate(items):
            out.append(ChunkRecord(key, None, None, None, None, name, at, length + version % 3,
                                   _checksum(version, rank, -1 - i), rank))
            at += length + version % 3
        return out

    def parallel_layout(self) -> ParallelLayout:
        return ParallelLayout(self.layout.tp, self.layout.pp, self.layout.dp, self.distributed, self.cfg.num_layers,
                              self.bf16)


def _checksum(version: int, rank: int, index: int) -> int:
    return hash((version, rank, index)) & (2**64 - 1)


# -- the code as it was: the reference of the "before" column ------------------------------------

def pairwise_tiling(key, global_shape, chunks, complete: bool = True) -> None:
    """The tiling check as it was: every pair of chunks of a key compared (``complete``: as
    ``checkpointing.format.metadata._check_tiling``'s; only whole jobs are built pairwise here)."""
    total = 0
    for c in chunks:
        if any(o < 0 or o + s > g for o, s, g in zip(c.offsets, c.sizes, global_shape)):
            raise TilingError(f"{key}: chunk at {c.offsets} exceeds {global_shape}")
        total += math.prod(c.sizes)
    for i, a in enumerate(chunks):
        for b in chunks[i + 1:]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise TilingError(f"{key}: chunks overlap at {a.offsets} / {b.offsets}")
    if complete and total != math.prod(global_shape):
        raise TilingError(f"{key}: chunks cover {total} of {math.prod(global_shape)} elements")


class ScanIndex(ChunkIndex):
    """The load plan as it was: every chunk of the key tested against every piece."""

    def overlapping(self, key, offset, shape):
        return [c for c in self.metadata.state_dict_metadata[key].chunks
                if overlap(offset, shape, c.offsets, c.sizes) is not None]


def _build_pairwise(records, iteration, layout, conn) -> None:
    from checkpointing.format import metadata as metadata_module

    metadata_module._check_tiling = pairwise_tiling
    started = time.perf_counter()
    build_metadata(records, iteration, layout)
    conn.send(time.perf_counter() - started)


def timed_pairwise_build(records, iteration, layout, cap_s: float) -> float | None:
    """Seconds of ``build_metadata`` with the pairwise tiling check, in a forked child; None past ``cap_s``."""
    parent, child = mp.get_context("fork").Pipe()
    process = mp.get_context("fork").Process(target=_build_pairwise, args=(records, iteration, layout, child))
    process.start()
    deadline = time.monotonic() + cap_s
    while not parent.poll(0.2) and process.is_alive() and time.monotonic() < deadline:
        pass
    seconds = parent.recv() if parent.poll() else None
    if process.is_alive():
        process.kill()
    process.join()
    if seconds is None and process.exitcode not in (0, -9):  # it failed, not ran out of time
        raise RuntimeError(f"the pairwise metadata build failed in its child (exit code {process.exitcode}); "
                           "its traceback is above")
    return seconds


def _seconds(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def _write(directory: str, metadata) -> tuple[float, int]:
    seconds, _ = _seconds(write_metadata, directory, metadata)
    return seconds, os.path.getsize(os.path.join(directory, ".metadata"))


def _plan_load(directory: str, index_class, pieces_of, sample: list[int]) -> tuple[float, float, int]:
    """(seconds to read the .metadata, the slowest sampled rank's plan seconds, the chunks every
    sampled rank wants: the scan and the index must find the same)."""
    read_s, metadata = _seconds(read_metadata, directory)
    slowest, wanted = 0.0, 0
    for rank in sample:
        index = index_class(metadata)  # per rank: each rank indexes its own reader's metadata
        seconds, (chunks, _) = _seconds(wanted_chunks, metadata, index, pieces_of(rank), frozenset(), directory)
        slowest, wanted = max(slowest, seconds), wanted + len(chunks)
    return read_s, slowest, wanted


def _plan_versions(gathered: list[list[ChunkRecord]], records_of, ranks, versions: int, layout, local_files,
                   directory: str) -> dict:
    """A level's save plan over ``ranks``, as the coordinator runs it into ``directory``: version 1
    built from ``gathered`` (the sweep check) and written, versions 2.. filled and written.
    Returns the plan's build and first write seconds, the .metadata size, the best fill and write
    seconds, and each rank's pickled payload bytes at the last version."""
    plans = [SavePlan() for _ in ranks]
    sent = [p.rank.payload(rs) for p, rs in zip(plans, gathered)]
    out: dict = {}
    out["build_s"], metadata = _seconds(plans[0].metadata, sent, 1, layout, local_files)
    out["first_write_s"], out["metadata_bytes"] = _write(directory, metadata)
    for p in plans:
        p.committed()
    fills, writes = [], []
    for version in range(2, 2 + versions):
        payloads = [p.rank.payload(records_of(r, version)) for p, r in zip(plans, ranks)]
        out["sizes"] = [len(pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL)) for p in payloads]
        seconds, metadata = _seconds(plans[0].metadata, payloads, version, layout, local_files)
        fills.append(seconds)
        writes.append(_write(directory, metadata)[0])
        for p in plans:
            p.committed()
    out["fill_s"], out["write_s"] = min(fills), min(writes)
    return out


def run_case(case: ScaleCase, cap_s: float, versions: int = 3, sample_ranks: int = 4) -> dict:
    """Every figure of one case, before and after."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401 - imported once, not inside the first timing
    cfg = model_config(case.model)
    sim = Simulated(cfg, case.save, case.shard_size_mb, case.bf16)
    target = Simulated(cfg, case.load, case.shard_size_mb, case.bf16)
    world = case.save.world
    row: dict = {"case": case, "ranks": world}
    simulate_s, gathered = _seconds(lambda: [sim.records(r, 1) for r in range(world)])
    row["simulate_s"] = simulate_s
    row["records"] = sum(len(rs) for rs in gathered)
    sizes = [len(pickle.dumps(rs, protocol=pickle.HIGHEST_PROTOCOL)) for rs in gathered]
    row["before_rank_bytes_max"], row["before_gather_bytes"] = max(sizes), sum(sizes)
    flat = [r for rs in gathered for r in rs]
    layout = sim.parallel_layout()
    row["before_build_s"] = timed_pairwise_build(flat, 1, layout, cap_s)
    with tempfile.TemporaryDirectory() as directory:
        # after: the plan's first version (built from scratch, the sweep check), then versions filled
        plan = _plan_versions(gathered, sim.records, range(world), versions, layout, None, directory)
        row["plan_build_s"], row["before_write_s"] = plan["build_s"], plan["first_write_s"]
        row["metadata_bytes"], row["after_fill_s"], row["after_write_s"] = (plan["metadata_bytes"], plan["fill_s"],
                                                                            plan["write_s"])
        row["after_rank_bytes_max"], row["after_gather_bytes"] = max(plan["sizes"]), sum(plan["sizes"])
        sample = sorted({0, target.layout.world - 1, *range(0, target.layout.world,
                                                             max(1, target.layout.world // sample_ranks))})[:sample_ranks + 1]
        load_pieces = lambda rank: target.pieces(rank)[1]  # noqa: E731 - a rank's pieces in the new layout
        row["read_s"], row["before_plan_s"], row["wanted"] = _plan_load(directory, ScanIndex, load_pieces, sample)
        _, row["after_plan_s"], wanted = _plan_load(directory, ChunkIndex, load_pieces, sample)
        if wanted != row["wanted"]:
            raise RuntimeError(f"{case.name}: the indexed plan found {wanted} chunks, the scan {row['wanted']}")
    return row


def run_node_local(case: ScaleCase, node_size: int, versions: int = 3) -> dict:
    """A node-local level (L1) on one node of ``node_size`` ranks (node 0: ranks 0..node_size-1,
    the node with rank 0's ``common``): what its coordinator gathers, builds once, fills per
    version and writes (``checkpointing.format.commit``: a node gathers its own ranks only)."""
    cfg = model_config(case.model)
    sim = Simulated(cfg, case.save, case.shard_size_mb, case.bf16)
    ranks = list(range(min(node_size, case.save.world)))
    local_files = [data_file_name(r) for r in ranks]
    layout = sim.parallel_layout()
    row: dict = {"case": case, "node_size": len(ranks)}
    gathered = [sim.records(r, 1, replicas=True) for r in ranks]
    row["records"] = sum(len(rs) for rs in gathered)
    with tempfile.TemporaryDirectory() as directory:
        plan = _plan_versions(gathered, lambda rank, version: sim.records(rank, version, replicas=True), ranks,
                              versions, layout, local_files, directory)
        row.update({k: plan[k] for k in ("build_s", "first_write_s", "metadata_bytes", "fill_s", "write_s")})
        row["gather_bytes"] = sum(plan["sizes"])
        row["read_s"], _ = _seconds(read_metadata, directory)
    return row


def node_local_table(rows: list[dict], cap_s: float) -> str:
    """The markdown table of :func:`run_node_local` rows."""
    lines = ["| case | node | records of the node | its coordinator gathers per version | build (once) | "
             "fill per version | .metadata write, first / per version | .metadata size | read .metadata |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        lines.append(f"| {c.name} ({c.model}) | {r['node_size']} ranks of {c.save.world:,} | {r['records']:,} "
                     f"| {_mb(r['gather_bytes'])} | {_s(r['build_s'], cap_s)} | {_s(r['fill_s'], cap_s)} "
                     f"| {_s(r['first_write_s'], cap_s)} / {_s(r['write_s'], cap_s)} | {_mb(r['metadata_bytes'])} "
                     f"| {_s(r['read_s'], cap_s)} |")
    return "\n".join(lines)


def _s(value: float | None, cap_s: float) -> str:
    return f"> {cap_s:.0f} s" if value is None else (f"{value:.3f} s" if value < 10 else f"{value:.1f} s")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def table(rows: list[dict], cap_s: float) -> str:
    """The markdown table of :func:`run_case` rows."""
    lines = [
        "| case | layout (load into) | records | rank sends (max), before / after | gathered in all, before / after "
        "| coordinator build, before / after (once) / per version | .metadata write, first / per version | "
        ".metadata size | read .metadata | load plan per rank, scan / index |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["case"]
        lines.append(
            f"| {c.name} ({c.model}) | {c.save.describe()} ({c.load.describe()}) | {r['records']:,} "
            f"| {_mb(r['before_rank_bytes_max'])} / {_mb(r['after_rank_bytes_max'])} "
            f"| {_mb(r['before_gather_bytes'])} / {_mb(r['after_gather_bytes'])} "
            f"| {_s(r['before_build_s'], cap_s)} / {_s(r['plan_build_s'], cap_s)} / {_s(r['after_fill_s'], cap_s)} "
            f"| {_s(r['before_write_s'], cap_s)} / {_s(r['after_write_s'], cap_s)} | {_mb(r['metadata_bytes'])} "
            f"| {_s(r['read_s'], cap_s)} | {_s(r['before_plan_s'], cap_s)} / {_s(r['after_plan_s'], cap_s)} |")
    return "\n".join(lines)
