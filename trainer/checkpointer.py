"""Checkpointing in the training loop: probe at start-up, load, save at intervals, finish.

The synchronous path snapshots the state and writes it to ``--save`` right away; with
``--async-save`` the engine (``checkpointing.engine``) does the same work beside training. Both
write the same bytes through ``checkpointing.commit``.
"""

from __future__ import annotations

import os
import time
import uuid

import torch.distributed as dist

from checkpointing.commit import gather_from_all, save_and_commit
from checkpointing.config import CheckpointConfig
from checkpointing.discovery import StoredCheckpoint, load_candidates
from checkpointing.errors import CheckpointCorruptError, CheckpointMismatchError, CheckpointNotFoundError
from checkpointing.peers import directory_peers
from checkpointing.reader import CheckpointReader
from checkpointing.writer import data_file_name
from trainer.checkpoint_state import TrainerCheckpointState


class _NotHere(Exception):
    """This candidate cannot be used in this run (not an error: the next one is tried)."""


class SaveDirError(OSError):
    """A checkpoint directory cannot be written; raised at start-up, before the model is built."""


def probe_writable(directory: str, rank: int) -> None:
    """Create ``directory`` and a file in it, or raise naming the directory and the rank."""
    probe = os.path.join(directory, f".write-probe-{rank}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as error:
        raise SaveDirError(error.errno, f"rank {rank}: checkpoint directory {directory} is not writable "
                                        f"({error.strerror or error}); fix its permissions or pass another --save") from None


def check_checkpoint_dirs(cfg: CheckpointConfig, rank: int) -> None:
    """Every rank checks the directories it will write, before any heavy work."""
    for directory in (cfg.save, cfg.local_dir):
        if directory:
            probe_writable(directory, rank)


class Checkpointer:
    """Owns this rank's checkpointing for one run."""

    def __init__(self, cfg: CheckpointConfig, trainer, logger, tracer=None, telemetry: bool = False):
        """``telemetry``: report the engine's counters to TensorBoard each iteration (every rank
        must pass the same value: it is a collective)."""
        self.cfg = cfg
        self.tracer = tracer
        self.trainer = trainer
        self.logger = logger
        self.state = TrainerCheckpointState(trainer, load_optimizer=cfg.load_optim, load_rng=cfg.load_rng)
        # A gloo group of its own: checkpoint metadata are CPU objects, and the async engine's
        # background thread must not share a communicator with training.
        self.group = dist.new_group(backend="gloo")
        self.last_saved: int | None = None
        self.loaded: int | None = None
        """The iteration loaded at start (0: from scratch); nothing new to save while unchanged."""
        self.local_peers = self._find_peers()
        self.engine = None
        if cfg.async_save:
            from checkpointing.engine import CheckpointEngine

            self.engine = CheckpointEngine.for_config(cfg, self.state, self.group, logger.info,
                                                      trainer.groups.rank, self.state.layout, tracer, self.local_peers)
            trainer.optimizer.before_shard_update.append(lambda shard: self.engine.fence(shard.index))
        self.telemetry = None
        if self.engine is not None and telemetry:
            from trainer.checkpoint_telemetry import CheckpointTelemetry

            self.telemetry = CheckpointTelemetry(self.engine, logger.writer, dist.new_group(backend="gloo"))

    def _find_peers(self) -> list[int] | None:
        """Which ranks share this rank's L1 directory (its node); checks that L2 is shared."""
        world = dist.get_world_size(self.group)
        if self.cfg.save and world > 1:
            shared = directory_peers(self.cfg.save, self.group)
            if len(shared) < world:
                self.logger.info(f"WARNING: --save {self.cfg.save} is not the same directory on every rank (rank "
                                 f"{dist.get_rank(self.group)} shares it with ranks {shared} only); L2 must be a file "
                                 "system all nodes share, or its checkpoints cannot be committed whole")
        if not self.cfg.local_dir or world == 1:
            return None
        peers = directory_peers(self.cfg.local_dir, self.group)
        nodes = len({tuple(p) for p in gather_from_all(self.group, peers)})
        if nodes > 1:
            self.logger.info(f"> checkpoint: L1 {self.cfg.local_dir} is node-local ({nodes} nodes); each node keeps "
                             "its own ranks' files, and restores from it only in the same layout")
        return peers

    # -- load ---------------------------------------------------------------------------------------
    def candidates(self) -> list[tuple[str, StoredCheckpoint]]:
        """(level, checkpoint) to try, newest first; at equal step the faster level first.

        Only checkpoints every rank sees committed are candidates: a node-local level (L1) on
        one node may hold versions another node lost (a replaced node), and every rank must try
        the same list in the same order."""
        found: list[tuple[int, int, str, StoredCheckpoint]] = []
        levels = [("L1", self.cfg.local_dir), ("L2", self.cfg.load)]
        for speed, (level, root) in enumerate(levels):
            if not root:
                continue
            stored, notes = load_candidates(root, self.cfg.ckpt_step)
            for note in notes:
                self.logger.info(f"> checkpoint: {note}")
            seen = gather_from_all(self.group, [c.iteration for c in stored])
            everywhere = set.intersection(*[set(s) for s in seen])
            for c in stored:
                if c.iteration not in everywhere:
                    missing = [r for r, s in enumerate(seen) if c.iteration not in s]
                    self.logger.info(f"> checkpoint: {level} iteration {c.iteration} is not committed on ranks "
                                     f"{missing[:8]}{' ...' if len(missing) > 8 else ''} (their node lost it); not loaded")
            found += [(-c.iteration, speed, level, c) for c in stored if c.iteration in everywhere]
        return [(level, c) for _, _, level, c in sorted(found, key=lambda t: t[:2])]

    def load(self) -> int:
        """Load the newest valid committed checkpoint; returns its iteration (0: from scratch).

        With the engine, a version in host memory (L0) that survived the previous run is taken
        when it is at least as new as anything on disk; every other L0 version is dropped then.
        """
        kept = None
        try:
            iteration, kept = self._load()
        finally:
            if self.engine is not None:
                self.engine.keep_only(kept)
        self.loaded = iteration
        return iteration

    def _l0_candidate(self):
        """(version, slot) of the newest snapshot every rank holds in shared memory, or None."""
        mine = {slot.version: slot for slot in self.engine.pool.slots
                if slot.version is not None and slot.layout == self.state.layout}
        shared = set.intersection(*[set(v) for v in gather_from_all(self.group, sorted(mine))])
        if self.cfg.ckpt_step is not None:
            shared &= {self.cfg.ckpt_step}
        if not shared:
            return None
        version = max(shared)
        return version, mine[version]

    def _load_from_l0(self, version: int, slot) -> None:
        started = time.perf_counter()
        self.state.restore_arrays(slot.arrays)
        common = gather_from_all(self.group, slot.objects.get("common"))[0]  # rank 0 captured it
        objects = {"common": common}
        if self.cfg.load_rng:
            objects.update({k: v for k, v in slot.objects.items() if k.startswith("rng_state.")})
        self._note(self.state.restore_objects(objects))
        self.logger.info(f"> loaded iteration {version} from L0 (shared memory {slot.path}, kept from the previous run; "
                         f"{time.perf_counter() - started:.2f} s)")

    def _note(self, note: str | None) -> None:
        if note is not None:
            self.logger.info(f"> {note}")

    def _load(self):
        cfg = self.cfg
        if not cfg.load:
            return 0, None
        candidates = self.candidates()
        l0 = self._l0_candidate() if self.engine is not None else None
        if l0 is not None and (not candidates or l0[0] >= candidates[0][1].iteration):
            self._load_from_l0(*l0)
            return l0[0], l0[1]
        if not candidates:
            if cfg.ckpt_step is not None:
                raise CheckpointNotFoundError(
                    f"--ckpt-step {cfg.ckpt_step}: no committed checkpoint of that iteration in {cfg.load}")
            self.logger.info(f"> no committed checkpoint in {cfg.load}: training starts from scratch")
            return 0, None
        wanted_model_keys = set().union(*gather_from_all(self.group, sorted({p.key for p in self.state.load_pieces
                                                                    if not p.key.startswith("optimizer.")})))
        for level, candidate in candidates:
            started = time.perf_counter()
            self.logger.info(f"> loading checkpoint from {candidate.path} ({level}) ...")
            outcome, read_bytes, objects = None, 0, {}
            node_local = False
            try:
                reader = CheckpointReader(candidate.path, verify=cfg.verify_checksums)
                node_local = reader.local_files is not None
                if node_local:
                    read_bytes, objects = self._read_node_local(reader)
                else:
                    read_bytes, objects = self._read_shared(reader, wanted_model_keys)
            except _NotHere as why:
                outcome = ("skip", str(why))
            except CheckpointMismatchError as error:
                outcome = ("mismatch", str(error))
            except (CheckpointCorruptError, OSError) as error:
                outcome = ("corrupt", str(error))
            outcomes = gather_from_all(self.group, outcome)
            failures = [(r, o) for r, o in enumerate(outcomes) if o is not None]
            if not failures:
                if node_local:
                    self._share_common(objects)
                    self.trainer.optimizer.publish_main_params()  # the weights, from the restored main weights
                self._note(self.state.restore_objects(objects))
                if len(objects) == 1 and cfg.load_rng:
                    self.logger.info("> checkpoint: saved with another layout; RNG states not loaded")
                self.logger.info(f"> loaded iteration {candidate.iteration} from {candidate.path} "
                                 f"({read_bytes / 1e6:.1f} MB on the logging rank, {time.perf_counter() - started:.2f} s)")
                return candidate.iteration, None
            if all(kind == "skip" for _, (kind, _) in failures):
                self.logger.info(f"> checkpoint: {candidate.path} ({level}) passed over: {failures[0][1][1]}")
                continue
            message = "; ".join(f"rank {r}: {text}" for r, (_, text) in failures)
            if any(kind == "mismatch" for _, (kind, _) in failures):
                raise CheckpointMismatchError(message)
            if cfg.ckpt_step is not None:
                raise CheckpointCorruptError(f"--ckpt-step {cfg.ckpt_step} cannot be loaded: {message}")
            self.logger.info(f"WARNING: checkpoint {candidate.path} is damaged, trying the previous committed one: {message}")
        raise CheckpointCorruptError(
            f"every committed checkpoint in {cfg.load} is damaged (see the warnings above); nothing was deleted. "
            f"Start from scratch with another --load, or repair the files")

    def _read_shared(self, reader: CheckpointReader, wanted_model_keys: set[str]) -> tuple[int, dict]:
        """Read this rank's pieces in the current layout from whichever chunks hold them."""
        extra = sorted(k for k in reader.tensor_keys() - wanted_model_keys if not k.startswith("optimizer."))
        if extra:
            raise CheckpointMismatchError(
                f"{reader.directory} holds tensors this model has no place for: {extra[:4]}"
                f"{' ...' if len(extra) > 4 else ''} ({len(extra)} in all); the saved model was larger "
                f"(layers {reader.facts['layout'].get('num_layers')}, this model "
                f"{self.state.layout['num_layers']})")
        read_bytes = reader.read_pieces(self.state.load_pieces, self.state.load_arrays)
        objects = {"common": reader.read_object("common")}
        same_layout = reader.facts["layout"] == self.state.layout
        for key in self.state.objects_to_load()[1:]:
            if same_layout and reader.has(key):
                objects[key] = reader.read_object(key)
        return read_bytes, objects

    def _read_node_local(self, reader: CheckpointReader) -> tuple[int, dict]:
        """Restore from a node-local checkpoint: each rank reads back its own file (the pieces it
        saved, replicas included); the weights are then published from the main weights."""
        if reader.facts["layout"] != self.state.layout:
            raise _NotHere("it is node-local and was saved in another layout; a node holds only its own "
                           "ranks' files, so it restores only into the same layout")
        if not self.cfg.load_optim:
            raise _NotHere("it is node-local, which restores the optimizer state; --no-load-optim reads "
                           "the weights from the shared level instead")
        pieces = [p for p in self.state.save_pieces if p.key.startswith("optimizer.")]
        read_bytes = reader.read_own_pieces(data_file_name(self.trainer.groups.rank), pieces, self.state.arrays)
        # ``common`` is in the file of the rank that captured it, on its node only: shared after
        # every rank succeeded (``_share_common``).
        keys = [k for k in self.state.objects_to_load() if reader.object_file(k) in reader.local_files]
        return read_bytes, {key: reader.read_object(key) for key in keys}

    def _share_common(self, objects: dict) -> None:
        held = [c for c in gather_from_all(self.group, objects.get("common")) if c is not None]
        if not held:
            raise CheckpointCorruptError("no node holds the checkpoint's common state")
        objects["common"] = held[0]

    # -- save ---------------------------------------------------------------------------------------
    def after_step(self, iteration: int) -> None:
        """Called after the optimizer step of ``iteration``."""
        cfg = self.cfg
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
            self.save(iteration)
        if self.engine is not None:
            self.engine.set_iteration(iteration + 1)
        if self.telemetry is not None:
            self.telemetry.after_step(iteration)

    def save(self, iteration: int) -> None:
        if self.engine is not None:
            self.engine.request(iteration)
        else:
            self.save_sync(iteration)
        self.last_saved = iteration

    def save_sync(self, iteration: int) -> None:
        self.logger.info(f"> saving checkpoint at iteration {iteration:7d} to {self.cfg.save}")
        self.trainer.device_ctx.synchronize()
        arrays = {name: a.detach().cpu() for name, a in self.state.arrays.items()}
        result = save_and_commit(self.cfg.save, iteration, arrays, self.state.save_pieces,
                                 self.state.capture_objects(iteration), self.state.layout, self.group,
                                 self.cfg.save_retain_last)
        self.logger.info(f"  successfully saved checkpoint at iteration {iteration:7d} to {self.cfg.save} "
                         f"[ {result.seconds * 1000:.0f} ms, {result.bytes_written / 1e6:.1f} MB on the logging rank ]")

    def finish(self, iteration: int, train_seconds: float = 0.0) -> None:
        """Save the final state to ``--save`` (unless just saved there); drain the engine's levels;
        print the end-of-run summary."""
        if iteration == self.loaded and self.last_saved is None:
            self.logger.info(f"> nothing trained since iteration {iteration} was loaded: no new checkpoint")
            if self.engine is not None:
                self.engine.close(drain=True)
            return
        if self.engine is not None:
            if self.last_saved == iteration:
                self.engine.flush_everywhere(iteration)
            else:
                self.engine.request(iteration, force_flush=True)
            self.engine.close(drain=True)
            self._summary(train_seconds)
        elif self.cfg.save and self.last_saved != iteration:
            self.save(iteration)

    def abort(self) -> None:
        """After an error in training: stop background work without draining (L0 keeps its data)."""
        if self.engine is not None:
            self.engine.close(drain=False)

    def _summary(self, train_seconds: float) -> None:
        """Total stall (worst rank) and its share of training, flushes per level, bytes, slowest level."""
        import json

        stats = self.engine.stats
        mine = {"rank": self.trainer.groups.rank, "stall_seconds": stats.stall_seconds,
                "stall_by_iteration": {str(k): v for k, v in sorted(stats.stall_by_iteration.items())},
                "fence_waits": stats.fence_waits, "snapshots": stats.copies,
                "requests": stats.requests, "request_seconds": stats.request_seconds,
                "copy_seconds": stats.copy_seconds,
                "state_bytes": sum(a.numel() * a.element_size() for a in self.state.arrays.values()),
                "flushes": [vars(f) for f in stats.flushes], "skipped": dict(stats.skipped)}
        if self.tracer is not None and self.trainer.job.training.trace_dir:
            with open(os.path.join(self.trainer.job.training.trace_dir, f"checkpoint-stats-rank{mine['rank']}.json"), "w") as f:
                json.dump(mine, f)
        everyone = gather_from_all(self.group, mine)
        worst = max(everyone, key=lambda m: m["stall_seconds"])
        share = 100 * worst["stall_seconds"] / train_seconds if train_seconds else 0.0
        lines = [f"> checkpointing summary: stall {worst['stall_seconds'] * 1000:.1f} ms in all on the worst rank "
                 f"({worst['rank']}), {share:.2f}% of {train_seconds:.1f} s of training; "
                 f"{sum(m['fence_waits'] for m in everyone)} fence waits; {stats.copies} snapshots (L0)"]
        slowest = None
        for level in [lv.name for lv in self.engine.levels]:
            done = [f for m in everyone for f in m["flushes"] if f["level"] == level and f["error"] is None]
            failed = sum(1 for m in everyone for f in m["flushes"] if f["level"] == level and f["error"])
            versions = len({f["version"] for f in done})
            nbytes = sum(f["bytes"] for f in done)
            seconds = max((f["seconds"] for f in done), default=0.0)
            rate = nbytes / max(sum(f["seconds"] for f in done), 1e-9) / 1e9 * len(everyone) if done else 0.0
            lines.append(f"  {level}: {versions} checkpoints, {nbytes / 1e9:.3f} GB written, slowest flush {seconds:.2f} s, "
                         f"~{rate:.2f} GB/s, {stats.skipped.get(level, 0)} superseded, {failed} failed (rank-flushes)")
            if done and (slowest is None or rate < slowest[1]):
                slowest = (level, rate)
        if slowest:
            lines.append(f"  slowest level: {slowest[0]} (~{slowest[1]:.2f} GB/s)")
        for line in lines:
            self.logger.info(line)
