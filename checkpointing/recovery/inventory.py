"""Every checkpoint of a job on every level, with its state: what ``rollback.sh --list`` shows.

States: ``committed`` (metadata present, every data file whole; with ``verify`` every checksum
matches too), ``partial`` (no committed metadata: an interrupted save), ``corrupt`` (committed
but a file is missing, short, or a checksum differs), ``refused`` (its metadata would run code to
be read: tampered, see ``checkpointing.base.safe_pickle``). L0 versions and their peer replicas
(``replica``, one line per version with the nodes that hold it) are ``in memory``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import xxhash

from checkpointing.base.durable import describe_tracker
from checkpointing.base.errors import CheckpointCorruptError, CheckpointError, CheckpointUntrustedError
from checkpointing.base.levels import L0, L1, L2
from checkpointing.format.discovery import list_checkpoints
from checkpointing.format.metadata import read_metadata
from checkpointing.storage import description_file, pool_files

REPLICA = "replica"
"""The level column of a peer replica's line (``--ckpt-peer-replicas``)."""


@dataclass(frozen=True)
class Entry:
    level: str
    iteration: int
    state: str
    size_bytes: int
    path: str
    """Where it is (L0: one pattern for every rank's slot of the version)."""
    detail: str = ""
    paths: tuple[str, ...] = ()
    """L0: every rank's slot file of the version on this node."""


def check_directory(path: str, verify: bool) -> tuple[str, str]:
    """(state, detail) of one ``iter_N`` directory."""
    try:
        metadata = read_metadata(path, inert=True)  # places and facts only: no torch for rollback.sh
    except FileNotFoundError:
        return "partial", "no committed metadata (interrupted save)"
    except CheckpointCorruptError as error:
        return "corrupt", str(error)
    except CheckpointUntrustedError as error:
        return "refused", str(error)
    # (file, offset, length) of every blob this directory should hold; a node-local level
    # holds only its node's files (and their replica pieces).
    local = metadata.gpt_ckpt.get("local_files")
    blobs = {(i.relative_path, i.offset, i.length) for i in metadata.storage_data.values()}
    blobs |= {(name, offset, length) for (name, _, _), (offset, length) in (metadata.gpt_ckpt.get("replicas") or {}).items()}
    blobs = sorted(b for b in blobs if local is None or b[0] in local)
    ends: dict[str, int] = {}
    for name, offset, length in blobs:
        ends[name] = max(ends.get(name, 0), offset + length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            return "corrupt", f"missing {name}"
        if os.path.getsize(file) < end:
            return "corrupt", f"{name} truncated ({os.path.getsize(file)} of {end} bytes)"
    if verify:
        checksums = metadata.gpt_ckpt["checksums"]
        for name, offset, length in blobs:
            with open(os.path.join(path, name), "rb") as f:
                f.seek(offset)
                if xxhash.xxh3_64_intdigest(f.read(length)) != checksums.get((name, offset)):
                    return "corrupt", f"checksum mismatch in {name} at offset {offset}"
    if local is not None:
        return "committed", f"node-local: this node's {len(local)} of the job's data files"
    return "committed", ""


def level_entries(level: str, root: str | None, verify: bool = False) -> list[Entry]:
    if not root:
        return []
    entries = []
    for c in list_checkpoints(root):
        state, detail = check_directory(c.path, verify)
        entries.append(Entry(level, c.iteration, state, c.size_bytes(), c.path, detail))
    return entries


def _described_slots(save_dir: str, host_dir: str, name: re.Pattern):
    """(slot path, description) of the job's slots under ``host_dir`` whose path matches ``name``
    (own slots or replicas), described and readable."""
    for path in pool_files.list_segments(pool_files.job_tag(save_dir), host_dir):
        if not path.endswith(".meta") or not name.search(path[: -len(".meta")]):
            continue
        try:
            try:  # a listing needs the version only: read without torch where the description allows
                description = description_file.read_plain_description(path)
            except description_file.NeedsTorchError:  # an older description, with tensors in its small state
                from checkpointing.storage import host_pool

                description = host_pool.read_description(path, decode_objects=False)
        except (OSError, CheckpointError):  # another user's file, damaged, or code: not listed, not run
            continue
        if description is not None:
            yield path[: -len(".meta")], description


def l0_entries(save_dir: str, host_dir: str = pool_files.SHM_DIR) -> list[Entry]:
    """Versions held in the job's shared-memory pool on this node (its ranks' slots, by version)."""
    by_version: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for data, description in _described_slots(save_dir, host_dir, _RANK_SLOT):
        version = description["version"]
        by_version.setdefault(version, []).append(data)
        sizes[version] = sizes.get(version, 0) + (os.path.getsize(data) if os.path.exists(data) else 0)
    entries = []
    for version, paths in sorted(by_version.items()):
        ranks = sorted({int(m.group(1)) for p in paths if (m := _RANK_SLOT.search(p))})
        directory = os.path.dirname(paths[0])
        pattern = os.path.join(directory, f"{pool_files.PREFIX}{pool_files.job_tag(save_dir)}-r*-s*")
        entries.append(Entry(L0, version, "in memory", sizes[version], pattern,
                             f"{len(paths)} rank slot(s): ranks {_ranges(ranks)}", tuple(sorted(paths))))
    return entries


_RANK_SLOT = re.compile(r"-r(\d+)-s\d+$")
_REPLICA_SLOT = re.compile(r"-r(\d+)-p(\d+)-s\d+$")


def replica_entries(save_dir: str, host_dirs: list[str]) -> list[Entry]:
    """Peer replicas (``--ckpt-peer-replicas``) of the job in the pools under ``host_dirs`` (one
    per node: a machine's ``/dev/shm``, or the directories that stand for nodes): one entry per
    version, saying which ranks' versions each node holds and which ranks hold them."""
    held: dict[int, dict[str, tuple[set[int], set[int], int]]] = {}
    for host_dir in host_dirs:
        for data, description in _described_slots(save_dir, host_dir, _REPLICA_SLOT):
            match = _REPLICA_SLOT.search(data)
            sources, holders, size = held.setdefault(description["version"], {}).get(host_dir, (set(), set(), 0))
            size += os.path.getsize(data) if os.path.exists(data) else 0
            held[description["version"]][host_dir] = (sources | {int(match.group(2))}, holders | {int(match.group(1))},
                                                      size)
    entries = []
    for version, by_node in sorted(held.items()):
        every = sorted(set().union(*(sources for sources, _, _ in by_node.values())))
        nodes = "; ".join(f"{host_dir}: ranks {_ranges(sorted(sources))} held by ranks {_ranges(sorted(holders))}"
                          for host_dir, (sources, holders, _) in sorted(by_node.items()))
        entries.append(Entry(REPLICA, version, "in memory", sum(size for _, _, size in by_node.values()),
                             ", ".join(sorted(by_node)), f"replicas of ranks {_ranges(every)} on {len(by_node)} "
                             f"node(s): {nodes}"))
    return entries


def _ranges(numbers: list[int]) -> str:
    """``0-3, 6`` for [0, 1, 2, 3, 6]."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def all_entries(save_dir: str, local_dir: str | None, verify: bool = False,
                host_dir: str | list[str] = pool_files.SHM_DIR) -> list[Entry]:
    """``host_dir``: the pool directory of this node, or several (each standing for a node)."""
    host_dirs = [host_dir] if isinstance(host_dir, str) else list(host_dir)
    return ([e for h in host_dirs for e in l0_entries(save_dir, h)] + replica_entries(save_dir, host_dirs)
            + level_entries(L1, local_dir, verify) + level_entries(L2, save_dir, verify))


def format_table(entries: list[Entry], save_dir: str, local_dir: str | None) -> str:
    lines = [f"{'level':<6}{'iteration':>10}  {'state':<10}{'size':>12}  path / detail"]
    for e in sorted(entries, key=lambda e: (e.level, e.iteration)):
        detail = f"  ({e.detail})" if e.detail else ""
        lines.append(f"{e.level:<6}{e.iteration:>10}  {e.state:<10}{e.size_bytes / 2**20:>9.1f} MiB  {e.path}{detail}")
    for level, root in ((L1, local_dir), (L2, save_dir)):
        if root:
            lines.append(f"{level} tracker ({root}): {describe_tracker(root)}")
    return "\n".join(lines)
