"""The save plan of one level: the metadata's layout part built and checked once, then filled.

From one version to the next of a running engine, the keys, global shapes, chunk rectangles and
each chunk's file and byte range are the same: only the checksums (and the iteration, and the
small state's byte items) change. Rebuilding the metadata from every rank's full records costs
the coordinator a tiling check and a gather of megabytes per version at 16k ranks
(``benchmarks/scale.py``). So the first committed version of a level is built from scratch
(``build_metadata``: tiling checked) and kept as a template; every later version each rank
sends only its tensor chunks' checksums (8 bytes each), the few places that moved, and its byte
items, and the coordinator fills the template, pickled from parts
(``checkpointing.format.metadata_encoding``: only what changed is pickled per version). The
``.metadata`` written decodes to the same object, field for field and in the same order, as
``build_metadata`` of the same records (``tests/test_save_plan.py``).

A tensor chunk whose key, rectangle, dtype, file or writer role changed is refused
(:class:`SavePlanChangedError`): the plan belongs to a layout, and a layout change restarts the
engine. A chunk whose byte range moved (its ``O_DIRECT`` padding depends on its memory's
alignment) is sent as a move, not refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from checkpointing.base.parallel_layout import ParallelLayout
from checkpointing.format.metadata import ChunkRecord, build_metadata
from checkpointing.format.metadata_encoding import MetadataEncoder

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from checkpointing.format.writer import RankFileLayout, RankFileWrite

CHECKED_LAYOUTS_KEPT = 16
"""Layouts a rank's plan remembers as checked (one per pool slot is the steady state)."""


class SavePlanChangedError(ValueError):
    """A rank's pieces are not those of the plan its level was built with (a bug, or a layout
    change without an engine restart); nothing is committed."""


def _geometry(r: ChunkRecord) -> tuple:
    """What the plan fixes of a tensor chunk (all but its byte range and checksum)."""
    return r.key, r.offsets, r.sizes, r.global_shape, r.dtype, r.relative_path, r.rank, r.is_writer


@dataclass(frozen=True)
class VersionPayload:
    """What a rank sends the coordinator for a version once the plan is built."""

    checksums: bytes
    """The xxh3-64 of each tensor chunk, in the plan's order, as little-endian uint64."""
    moved: tuple[tuple[int, int, int], ...]
    """(index, offset, length) of the tensor chunks whose byte range differs from the plan's."""
    items: tuple[ChunkRecord, ...]
    """The byte items (small state) in full: their bytes, hence their lengths, change."""


class RankSavePlan:
    """A rank's side of a level's plan: its tensor chunks as the template holds them."""

    def __init__(self) -> None:
        self.planned: list[tuple] | None = None
        """Geometry of each tensor chunk, once a version built from scratch committed."""
        self.places: list[tuple[int, int]] = []
        """(offset, length) of each, as the template holds them."""
        self.item_keys: tuple[str, ...] = ()
        self._pending: tuple | None = None
        self.file_layouts: dict = {}
        """This rank's data file layouts (``checkpointing.format.writer.RankFileLayout``), one per
        pool slot: worked out at a slot's first version, followed by the later ones."""
        self._checked: dict[int, tuple[RankFileLayout, tuple]] = {}
        """By ``id``: the layouts (held here, so no other takes the id) whose chunks were checked
        against the plan, each with its chunks' moves."""

    def payload_of(self, written: RankFileWrite) -> list[ChunkRecord] | VersionPayload:
        """:meth:`payload` of what a rank file holds. Once its layout has been checked against the
        plan, a later version from it sends its checksums without its records being made: the
        same layout writes the same chunks in the same places."""
        checked = self._checked.get(id(written.layout))
        if (self.planned is not None and checked is not None and checked[0] is written.layout
                and tuple(r.key for r in written.items) == self.item_keys):
            return VersionPayload(written.record_checksums().astype("<u8").tobytes(), checked[1], tuple(written.items))
        payload = self.payload(written.records())
        if isinstance(payload, VersionPayload):
            if len(self._checked) >= CHECKED_LAYOUTS_KEPT:
                self._checked.clear()
            self._checked[id(written.layout)] = (written.layout, payload.moved)
        return payload

    def payload(self, records: list[ChunkRecord]) -> list[ChunkRecord] | VersionPayload:
        """What to gather for this version's ``records``: all of them until a plan is built,
        then a :class:`VersionPayload`. Raises :class:`SavePlanChangedError`."""
        tensors = [r for r in records if r.offsets is not None]
        items = tuple(r for r in records if r.offsets is None)
        geometry = [_geometry(r) for r in tensors]
        places = [(r.offset, r.length) for r in tensors]
        if self.planned is None:
            self._pending = (geometry, places, tuple(r.key for r in items))
            return records
        if len(geometry) != len(self.planned):
            raise SavePlanChangedError(
                f"rank {records[0].rank if records else '?'} writes {len(geometry)} tensor chunks, its save plan "
                f"{len(self.planned)}: the pieces changed without a new layout; restart the checkpoint engine")
        for i, (now, then) in enumerate(zip(geometry, self.planned)):
            if now != then:
                raise SavePlanChangedError(
                    f"rank {now[6]}'s chunk {i} is {now[0]} at {now[1]} of {now[2]} ({now[4]}, {now[5]}), its save "
                    f"plan says {then[0]} at {then[1]} of {then[2]} ({then[4]}, {then[5]}): a piece changed its "
                    "size or place without a new layout; restart the checkpoint engine")
        item_keys = tuple(r.key for r in items)
        if item_keys != self.item_keys:
            raise SavePlanChangedError(f"rank {records[0].rank}'s small-state items {item_keys} are not its "
                                       f"save plan's {self.item_keys}; restart the checkpoint engine")
        # Moves are against the places the coordinator's template holds (the plan's first version), never the last version's
        moved = tuple((i, *now) for i, (now, then) in enumerate(zip(places, self.places)) if now != then)
        checksums = np.fromiter((r.checksum for r in tensors), dtype="<u8", count=len(tensors)).tobytes()
        return VersionPayload(checksums, moved, items)

    def committed(self) -> None:
        """The version of the last :meth:`payload` committed: the first one's chunks are the plan's now."""
        if self._pending is not None and self.planned is None:
            self.planned, self.places, self.item_keys = self._pending
        self._pending = None


@dataclass
class _RankPart:
    """The template's view of one rank's records."""

    blob_keys: list[tuple[str, int]]
    """(file, offset) of each tensor chunk: the checksums' keys."""
    index_keys: list[Any]
    """Its ``MetadataIndex`` in ``storage_data`` (None for a replica: not in DCP's view)."""
    replica_keys: list[tuple[str, str, tuple[int, ...]] | None]
    """Its key in ``gpt_ckpt["replicas"]`` (None for a writer's chunk)."""


class MetadataTemplate:
    """The coordinator's side: a version's metadata, to be filled with the next ones' checksums."""

    def __init__(self, gathered: list[list[ChunkRecord]], metadata: Metadata):
        from torch.distributed.checkpoint.metadata import MetadataIndex

        self.metadata = metadata
        self.parts: list[_RankPart] = []
        for records in gathered:
            tensors = [r for r in records if r.offsets is not None]
            self.parts.append(_RankPart(
                blob_keys=[(r.relative_path, r.offset) for r in tensors],
                index_keys=[MetadataIndex(r.key, r.offsets) if r.is_writer else None for r in tensors],
                replica_keys=[None if r.is_writer else (r.relative_path, r.key, tuple(r.offsets)) for r in tensors]))
        self._paths = {r.relative_path: r.relative_path for rs in gathered for r in rs}
        """One string object per file: pickle then writes each file name once, as for fresh records."""
        self._tensor_lengths = {(r.relative_path, r.offset): r.length for rs in gathered for r in rs
                                if r.offsets is not None}
        self.encoder = MetadataEncoder(metadata)

    def fill(self, payloads: list[VersionPayload], iteration: int, layout: ParallelLayout | dict[str, Any],
             local_files: list[str] | None) -> bytes:
        """The ``.metadata`` bytes of a version from every rank's payload: what ``build_metadata``
        would build from their full records, pickled from parts
        (``checkpointing.format.metadata_encoding``). Raises :class:`SavePlanChangedError` for a
        payload that does not fit the template."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if len(payloads) != len(self.parts):
            raise SavePlanChangedError(f"{len(payloads)} ranks sent a version, the save plan has {len(self.parts)}")
        base = self.metadata
        updates: dict = {}
        """The ``storage_data`` entries that differ from the template's: moved chunks, byte items."""
        replicas = base.gpt_ckpt["replicas"]
        keys: list[tuple[str, int]] = []
        values: list[int] = []
        lengths = self._tensor_lengths
        for rank, (part, payload) in enumerate(zip(self.parts, payloads)):
            if not isinstance(payload, VersionPayload) or len(payload.checksums) != 8 * len(part.blob_keys):
                raise SavePlanChangedError(f"rank {rank} sent no checksums for the {len(part.blob_keys)} tensor "
                                           "chunks of its save plan; restart the checkpoint engine")
            blob_keys = part.blob_keys
            if payload.moved:  # rare: a chunk's padding changed with its memory's alignment
                blob_keys = list(blob_keys)
                lengths = dict(lengths) if lengths is self._tensor_lengths else lengths
                replicas = dict(replicas) if replicas is base.gpt_ckpt["replicas"] else replicas
                for i, offset, length in payload.moved:
                    path = blob_keys[i][0]
                    blob_keys[i] = (path, offset)
                    lengths[(path, offset)] = length
                    if part.index_keys[i] is not None:
                        updates[part.index_keys[i]] = _StorageInfo(path, offset, length)
                    else:
                        replicas[part.replica_keys[i]] = (offset, length)
            keys += blob_keys
            values += np.frombuffer(payload.checksums, dtype="<u8").tolist()
            for r in payload.items:
                path = self._paths.get(r.relative_path, r.relative_path)
                updates[MetadataIndex(r.key)] = _StorageInfo(path, r.offset, r.length)
                keys.append((path, r.offset))
                values.append(r.checksum)
        # dict(zip()) keeps each key at its first place with its last value, as build_metadata's loop
        checksums = dict(zip(keys, values))
        items = {(r.relative_path, r.offset): r.length for p in payloads for r in p.items}
        total = sum(lengths.get(k, 0) if k not in items else items[k] for k in checksums)
        facts = dict(base.gpt_ckpt, iteration=iteration,
                     layout=layout.to_dict() if isinstance(layout, ParallelLayout) else dict(layout),
                     checksums=checksums, total_bytes=total, replicas=replicas,
                     local_files=sorted(local_files) if local_files is not None else None)
        return self.encoder.encode(updates, facts)


class SavePlan:
    """A level's plan on one rank: :class:`RankSavePlan`, and on its coordinator the template."""

    def __init__(self) -> None:
        self.rank = RankSavePlan()
        self.template: MetadataTemplate | None = None
        self._candidate: MetadataTemplate | None = None

    def metadata(self, gathered: list, iteration: int, layout: ParallelLayout | dict[str, Any],
                 local_files: list[str] | None) -> bytes:
        """(coordinator) This version's ``.metadata`` bytes: built from scratch (tiling checked)
        until a template is, then filled."""
        if self.template is not None:
            return self.template.fill(gathered, iteration, layout, local_files)
        if any(isinstance(g, VersionPayload) for g in gathered):
            raise SavePlanChangedError("ranks sent checksums only, but this coordinator has no save plan; "
                                       "restart the checkpoint engine")
        metadata = build_metadata([r for rs in gathered for r in rs], iteration, layout, local_files)
        self._candidate = MetadataTemplate(gathered, metadata)
        # The template's encoder has pickled all but the facts: this version is its first fill
        # (pickling the whole metadata once more cost as much again, once per level).
        return self._candidate.encoder.encode({}, metadata.gpt_ckpt)

    def committed(self) -> None:
        """The version committed on every rank: its chunks are the plan from now on."""
        self.rank.committed()
        if self._candidate is not None:
            self.template, self._candidate = self._candidate, None

