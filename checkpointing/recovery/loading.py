"""The load policy: what to resume from, and how, read top to bottom in :meth:`CheckpointLoader.load`.

- **Candidates** across levels: L0 (a snapshot in host memory that survived the previous run),
  L1 (node-local directory), L2 (``--load``), newest first; at equal step the faster level. Only
  versions every rank holds are candidates, so every rank tries the same list in the same order.
- **Reading** a candidate: an L0 snapshot or a node-local file restores this rank's own bytes in
  the layout that took them; the shared level reads each piece of the current layout from
  whichever stored chunks overlap it (resharding).
- **One loop**: each rank tries the candidate and meets an :class:`Outcome`; the ranks agree on
  the gravest (``checkpointing.recovery.load_outcome``) and act on it alike. Loaded: done. Passed over
  (not for this run, nothing wrong): the next one. Damaged: a warning, the next one (nothing is
  deleted). Another model, or a file that would run code: the run stops.
- **The refusal names its reason**: when nothing loads, the error says what each candidate came
  to; "damaged" only when something was.
- **One re-sync**: whatever the path, the state's ``after_load`` hook puts the small state back
  and makes the trainer's copies of the weights one state (``checkpointing.format.items.LoadedParts``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from checkpointing.base.agreement import common_to_all, gather_from_all
from checkpointing.base.config import CheckpointConfig
from checkpointing.base.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUntrustedError,
)
from checkpointing.base.levels import L0, L1, L2, MEMORY
from checkpointing.base.parallel_layout import ParallelLayout, how_saved
from checkpointing.format import keys
from checkpointing.format.discovery import StoredCheckpoint, load_candidates
from checkpointing.format.items import CheckpointableState, LoadedParts
from checkpointing.format.metadata import METADATA_NAME
from checkpointing.format.reader import CheckpointReader
from checkpointing.format.writer import data_file_name
from checkpointing.recovery.load_outcome import Attempt, Outcome, agree
from checkpointing.recovery.rollback import abandoning, nearest, rollbacks

LOADED = Attempt(Outcome.LOADED)


@dataclass
class _Read:
    """What this rank read of a candidate that loaded on it."""

    reader: CheckpointReader
    bytes_read: int
    small_state: dict
    """The byte items read: ``common`` (on a node-local level, on the nodes that hold it) and
    this rank's RNG states where they are restored."""
    optimizer: bool
    """Optimizer state was read (else the model's weights alone)."""
    node_local: bool
    common_shared: bool = False
    """``common`` was read on the nodes whose staged copy holds its file (a resume from host
    memory) and is shared from there."""


@dataclass(frozen=True)
class _Refused:
    """A candidate every rank agreed not to load, and why."""

    level: str
    checkpoint: StoredCheckpoint
    attempt: Attempt


class CheckpointLoader:
    """This rank's load of one run; every rank of the job makes one, alike, and calls :meth:`load`."""

    def __init__(self, cfg: CheckpointConfig, state: CheckpointableState, group, log: Callable[[str], None],
                 engine=None, memory=None):
        """``group``: the checkpoint layer's gloo group (every rank); ``engine``: the async engine,
        whose L0 pool may hold a previous run's snapshots (None: no L0); ``memory``: a version
        staged from host memory (``checkpointing.recovery.memory_recovery.MemoryCandidate``; None: none)."""
        self.cfg = cfg
        self.state = state
        self.group = group
        self.log = log
        self.engine = engine
        self.memory = memory
        self.rank = dist.get_rank(group)

    def candidates(self) -> list[tuple[str, StoredCheckpoint]]:
        """(level, checkpoint) on disk to try, newest first; at equal step the faster level first.

        Only checkpoints every rank sees committed are candidates: a node-local level (L1) on
        one node may hold versions another node lost (a replaced node), and every rank must try
        the same list in the same order."""
        found: list[tuple[int, int, str, StoredCheckpoint]] = []
        levels = [(L1, self.cfg.local_dir), (L2, self.cfg.load)]
        rolled_back = rollbacks(self.cfg.load)
        for speed, (level, root) in enumerate(levels):
            if not root:
                continue
            stored, notes = load_candidates(root, self.cfg.ckpt_step)
            for note in notes:
                self.log(f"> checkpoint: {note}")
            # A level rollback.sh was not told of (an L1 without --ckpt-local-dir) still holds the
            # abandoned branch: rollbacks.jsonl in --load says which versions are of it.
            kept = []
            for c in stored:
                record = abandoning(rolled_back, c.iteration, _written(c.path))
                if record is None:
                    kept.append(c)
                else:
                    self.log(f"> checkpoint: {c.path} is of the branch the rollback to {record['step']} abandoned "
                             f"({record.get('branch', '?')}); not loaded")
            stored = kept
            seen = gather_from_all(self.group, [c.iteration for c in stored])
            everywhere = set.intersection(*[set(s) for s in seen])
            for c in stored:
                if c.iteration not in everywhere:
                    missing = [r for r, s in enumerate(seen) if c.iteration not in s]
                    self.log(f"> checkpoint: {level} iteration {c.iteration} is not committed on ranks "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''} (their node lost it); not loaded")
            found += [(-c.iteration, speed, level, c) for c in stored if c.iteration in everywhere]
        return [(level, c) for _, _, level, c in sorted(found, key=lambda t: t[:2])]

    def load(self) -> tuple[int, int | None]:
        """Load the newest committed checkpoint this run can use. Returns (the iteration training
        goes on from: 0 from scratch or with ``--finetune``; the L0 version to keep, or None)."""
        cfg = self.cfg
        if not cfg.load:
            return 0, None
        candidates = self.candidates()
        if self.memory is not None:  # at equal step, memory before the disk levels
            held = (MEMORY, StoredCheckpoint(self.memory.version, self.memory.directory, True))
            candidates = ([c for c in candidates if c[1].iteration > held[1].iteration] + [held]
                          + [c for c in candidates if c[1].iteration <= held[1].iteration])
        l0 = self._l0_candidate() if self.engine is not None else None
        if l0 is not None and (not candidates or l0 >= candidates[0][1].iteration):
            return self._load_from_l0(l0), (None if cfg.finetune else l0)
        if not candidates:
            return self._start_without_checkpoint(), None
        wanted_model_keys = set().union(*gather_from_all(self.group, sorted(
            {p.key for p in self.state.load_pieces if not keys.is_optimizer_key(p.key)})))
        refused: list[_Refused] = []
        for level, candidate in candidates:
            started = time.perf_counter()
            self.log(f"> loading checkpoint from {candidate.path} ({level}) ...")
            mine, read = self._try(candidate, wanted_model_keys, level)
            agreed = agree(gather_from_all(self.group, mine))
            if agreed.outcome is Outcome.LOADED:
                return self._finish(level, candidate, read, started), None
            if agreed.outcome is Outcome.MISMATCH:
                raise CheckpointMismatchError(agreed.reason)
            if agreed.outcome is Outcome.UNTRUSTED:
                raise CheckpointUntrustedError(agreed.reason)  # never fallen back from: someone must look
            if agreed.outcome is Outcome.DAMAGED and cfg.ckpt_step is not None:
                raise CheckpointCorruptError(f"--ckpt-step {cfg.ckpt_step} cannot be loaded: {agreed.reason}")
            if agreed.outcome.passed_over:
                self.log(f"> checkpoint: {candidate.path} ({level}) passed over: {agreed.reason}")
            else:
                self.log(f"WARNING: checkpoint {candidate.path} is damaged, trying the previous committed one: "
                         f"{agreed.reason}")
            refused.append(_Refused(level, candidate, agreed))
        raise self._nothing_loaded(refused)

    # -- trying one candidate ------------------------------------------------------------------------
    def _try(self, candidate: StoredCheckpoint, wanted_model_keys: set[str], level: str) -> tuple[Attempt, _Read | None]:
        """This rank's attempt at ``candidate``, and what it read when it loaded."""
        try:
            reader = CheckpointReader(candidate.path, verify=self.cfg.verify_checksums,
                                      trust_pickles=self.cfg.trust_pickles)
            if reader.local_files is None:
                return LOADED, self._read_shared(reader, wanted_model_keys, staged=level == MEMORY)
            refusal = self._node_local_refusal(reader)
            if refusal is not None:
                return refusal, None
            return LOADED, self._read_node_local(reader)
        except CheckpointMismatchError as error:
            return Attempt(Outcome.MISMATCH, f"{error}{self._flags_that_differ(candidate)}"), None
        except CheckpointUntrustedError as error:
            return Attempt(Outcome.UNTRUSTED, str(error)), None
        except (CheckpointCorruptError, OSError) as error:
            return Attempt(Outcome.DAMAGED, str(error)), None

    def _flags_that_differ(self, candidate: StoredCheckpoint) -> str:
        """For a mismatch: the model flags whose saved value differs from this run's, from the
        checkpoint's recorded arguments (empty when they cannot be read here)."""
        try:
            common = CheckpointReader(candidate.path, verify=self.cfg.verify_checksums,
                                      trust_pickles=self.cfg.trust_pickles).read_object(keys.COMMON)
        except (CheckpointCorruptError, CheckpointUntrustedError, CheckpointMismatchError, OSError, KeyError):
            return ""
        differ = self.state.model_flag_differences(common.get("args", {})) if isinstance(common, dict) else []
        return f". The model flags that differ: {'; '.join(differ)}" if differ else ""

    def _node_local_refusal(self, reader: CheckpointReader) -> Attempt | None:
        """Why this run cannot use a node-local checkpoint (None: it can)."""
        saved = ParallelLayout.from_dict(reader.facts["layout"])
        if saved != self.state.layout:
            return Attempt(Outcome.OTHER_LAYOUT,
                           f"{reader.directory} is node-local and was {how_saved(saved, self.state.layout)}; a node "
                           "holds only its own ranks' files: load from L2 (--load) or restart in that layout")
        if not self.cfg.loads_optimizer:
            return Attempt(Outcome.WEIGHTS_ONLY,
                           f"{reader.directory} is node-local, which restores the optimizer state; --no-load-optim "
                           "and --finetune read the weights from the shared level (L2, --load) instead")
        return None

    def _read_shared(self, reader: CheckpointReader, wanted_model_keys: set[str], staged: bool = False) -> _Read:
        """Read this rank's pieces in the current layout from whichever chunks hold them: the
        optimizer's (main weights and moments), or with ``--no-load-optim``/``--finetune``, or
        from a weights-only checkpoint (``convert_checkpoint.py --from hf``), the model's weights.
        ``staged``: a copy staged from host memory, whose nodes hold only the files their ranks
        read (``common`` is read where its file is and shared)."""
        extra = sorted(k for k in reader.tensor_keys() - wanted_model_keys if not keys.is_optimizer_key(k))
        if extra:
            raise CheckpointMismatchError(
                f"{reader.directory} holds tensors this model has no place for: {extra[:4]}"
                f"{' ...' if len(extra) > 4 else ''} ({len(extra)} in all); the saved model was larger "
                f"(layers {reader.facts['layout'].get('num_layers')}, this model "
                f"{self.state.layout.num_layers})")
        optimizer = self.cfg.loads_optimizer and any(keys.is_optimizer_key(k) for k in reader.tensor_keys())
        if self.cfg.loads_optimizer and not optimizer:
            self.log(f"> checkpoint: {reader.directory} holds weights only: the optimizer starts afresh")
        pieces = [p for p in self.state.load_pieces if keys.is_optimizer_key(p.key) == optimizer]
        longer = reader.padded_rows_allowed(self.state.legacy_padded_keys)
        read_bytes = reader.read_pieces(pieces, self.state.load_arrays, longer)
        small_state = {}
        if not staged or os.path.exists(os.path.join(reader.directory, reader.object_file(keys.COMMON) or "")):
            small_state[keys.COMMON] = reader.read_object(keys.COMMON)
        rng = keys.rng_key(self.rank)
        same_layout = ParallelLayout.from_dict(reader.facts["layout"]) == self.state.layout
        if self.cfg.loads_rng and same_layout and reader.has(rng):
            small_state[rng] = reader.read_object(rng)
        return _Read(reader, read_bytes, small_state, optimizer, node_local=False, common_shared=staged)

    def _read_node_local(self, reader: CheckpointReader) -> _Read:
        """Restore from a node-local checkpoint: each rank reads back its own file (the pieces it
        saved, replicas included)."""
        pieces = [p for p in self.state.save_pieces if keys.is_optimizer_key(p.key)]
        longer = reader.padded_rows_allowed(self.state.legacy_padded_keys)
        read_bytes = reader.read_own_pieces(data_file_name(self.rank), pieces, self.state.arrays, longer)
        # ``common`` is in the file of the rank that captured it, on its node only: shared after
        # every rank succeeded (``_share_common``).
        wanted = [keys.COMMON] + ([keys.rng_key(self.rank)] if self.cfg.loads_rng else [])
        small_state = {key: reader.read_object(key) for key in wanted if reader.object_file(key) in reader.local_files}
        # A node-local file holds the main weights with the optimizer state.
        return _Read(reader, read_bytes, small_state, optimizer=True, node_local=True)

    # -- after every rank agreed ---------------------------------------------------------------------
    def _finish(self, level: str, candidate: StoredCheckpoint, read: _Read, started: float) -> int:
        """Every rank loaded ``candidate``: re-sync the state; returns the iteration to go on from."""
        if read.node_local or read.common_shared:
            self._share_common(read.small_state)
        rng = keys.rng_key(self.rank) in read.small_state
        if self.cfg.loads_rng and not rng:
            self.log("> checkpoint: saved with another layout; RNG states not loaded")
        # A node-local file holds the main weights; a shared load reads them with the optimizer
        # state, else the model's weights alone.
        optimizer = all(gather_from_all(self.group, read.optimizer))
        start = self._after_load(read.small_state, self._loaded_parts(
            candidate.iteration, level, read.node_local or optimizer, rng, optimizer))
        if any(gather_from_all(self.group, read.reader.full_unpickling)):
            self.log(f"> checkpoint: {candidate.path} was read with full unpickling (--trust-checkpoint-pickles): "
                     "it holds objects that need it; checkpoints this run writes do not")
        where = f"host memory (staged in {candidate.path})" if level == MEMORY else candidate.path
        self.log(f"> loaded iteration {candidate.iteration} from {where} "
                 f"({read.bytes_read / 1e6:.1f} MB on the logging rank, {time.perf_counter() - started:.2f} s)")
        return start

    def _share_common(self, small_state: dict) -> None:
        held = [c for c in gather_from_all(self.group, small_state.get(keys.COMMON)) if c is not None]
        if not held:
            raise CheckpointCorruptError("no node holds the checkpoint's common state")
        small_state[keys.COMMON] = held[0]

    def _loaded_parts(self, iteration: int, source: str, weights_in_arrays: bool, rng: bool,
                      optimizer: bool | None = None) -> LoadedParts:
        """``optimizer``: whether optimizer state was read (default: whether it was asked for)."""
        return LoadedParts(iteration, source, weights_in_arrays=weights_in_arrays,
                           optimizer=self.cfg.loads_optimizer if optimizer is None else optimizer,
                           rng=rng, resume=not self.cfg.finetune)

    def _after_load(self, small_state: dict, loaded: LoadedParts) -> int:
        """The one re-sync of every load path; returns the iteration training goes on from."""
        for note in self.state.after_load(small_state, loaded):
            self.log(f"> {note}")
        if not loaded.resume:
            self.log(f"> --finetune: the weights of iteration {loaded.iteration}; training starts at iteration 0 "
                     "with a fresh optimizer, data from the beginning")
        return loaded.iteration if loaded.resume else 0

    # -- L0 ------------------------------------------------------------------------------------------
    def _l0_candidate(self) -> int | None:
        """The newest snapshot every rank holds in shared memory, in this layout, or None; not
        one of a branch a rollback abandoned (``rollbacks.jsonl``, however the rollback was told
        of the pool)."""
        rolled_back = rollbacks(self.cfg.load)
        held = [v for v, written in self.engine.held_versions_written()
                if abandoning(rolled_back, v, written) is None]
        shared = common_to_all(self.group, held)
        if self.cfg.ckpt_step is not None:
            shared &= {self.cfg.ckpt_step}
        return max(shared) if shared else None

    def _load_from_l0(self, version: int) -> int:
        started = time.perf_counter()
        held = self.engine.restore(version)
        common = gather_from_all(self.group, held.get(keys.COMMON))[0]  # rank 0 captured it
        small_state = {keys.COMMON: common}
        if self.cfg.loads_rng:
            small_state.update({k: v for k, v in held.items() if keys.is_rng_key(k)})
        start = self._after_load(small_state, self._loaded_parts(version, L0, True, self.cfg.loads_rng))
        self.log(f"> loaded iteration {version} from L0 (shared memory, kept from the previous run; "
                 f"{time.perf_counter() - started:.2f} s)")
        return start

    # -- nothing loaded ------------------------------------------------------------------------------
    def _start_without_checkpoint(self) -> int:
        """No committed checkpoint anywhere: from scratch, unless one was asked for."""
        cfg = self.cfg
        if cfg.ckpt_step is not None:
            raise CheckpointNotFoundError(
                f"--ckpt-step {cfg.ckpt_step}: no committed checkpoint of that iteration in {cfg.load}"
                f"{f' or {cfg.local_dir}' if cfg.local_dir else ''}; nearest held: "
                f"{nearest(self._held_steps(), cfg.ckpt_step)}")
        if cfg.finetune:
            raise CheckpointNotFoundError(f"--finetune: no committed checkpoint in {cfg.load} to start from")
        self.log(f"> no committed checkpoint in {cfg.load}: training starts from scratch")
        return 0

    def _held_steps(self) -> list[int]:
        """Every committed step on L1 and L2 (not one of an abandoned branch), and L0's, this rank sees."""
        rolled_back = rollbacks(self.cfg.load)
        steps = {c.iteration for root in (self.cfg.local_dir, self.cfg.load) if root
                 for c in load_candidates(root)[0] if abandoning(rolled_back, c.iteration, _written(c.path)) is None}
        if self.engine is not None:
            steps |= {v for v, written in self.engine.held_versions_written()
                      if abandoning(rolled_back, v, written) is None}
        return sorted(steps)

    def _nothing_loaded(self, refused: list[_Refused]) -> Exception:
        """The error when every candidate was refused: what each came to, in its own words."""
        damaged = [r.checkpoint.path for r in refused if r.attempt.outcome is Outcome.DAMAGED]
        passed = [r.attempt for r in refused if r.attempt.outcome.passed_over]
        no_l2 = "" if any(r.level == L2 for r in refused) else f"; --load {self.cfg.load} holds no committed checkpoint"
        if not damaged:
            fits = "this layout" if all(a.outcome is Outcome.OTHER_LAYOUT for a in passed) else "this run"
            return CheckpointNotFoundError(f"No checkpoint fits {fits}: {'; '.join(a.reason for a in passed)}{no_l2}")
        paths = ", ".join(damaged)
        tail = f"{no_l2}; nothing was deleted. Start from scratch with another --load, or repair the files"
        if not passed:
            return CheckpointCorruptError(f"every committed checkpoint is damaged ({paths}; see the warnings above){tail}")
        return CheckpointCorruptError(f"No checkpoint can be loaded: {'; '.join(a.reason for a in passed)}; {paths} "
                                      f"{'is' if len(damaged) == 1 else 'are'} damaged (see the warnings above){tail}")


def _written(directory: str) -> float:
    """When a committed checkpoint was committed: its ``.metadata``'s modification time."""
    try:
        return os.stat(os.path.join(directory, METADATA_NAME)).st_mtime
    except OSError:
        return 0.0
