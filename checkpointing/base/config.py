"""Checkpointing options (Megatron-LM's flag names where it has them) as one validated config."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from checkpointing.base.levels import SHM_DIR
from checkpointing.base.private_files import POOL_DIR_PREFIX
from cli.flags import flag, flag_name

SNAPSHOT_MODES = ("auto", "zero-copy", "copy")
FLUSHER_STARTS = ("template", "interpreter")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where, when and how checkpoints are saved and loaded."""

    save: str | None = flag("--save", None)
    """L2, the persistent checkpoint directory; also where a synchronous save goes."""
    save_interval: int | None = flag("--save-interval", None)
    """Checkpoint every this many iterations; with ``--async-save`` this is the L0 (host memory)
    interval."""
    load: str | None = flag("--load", None)
    """Resume from the newest committed checkpoint in this directory; an empty one starts from
    scratch, and one that does not exist is refused (a typo) unless it is ``--save`` too."""
    ckpt_step: int | None = flag("--ckpt-step", None)
    """Load exactly this iteration; an error if it is damaged or absent."""
    ckpt_format: str = flag("--ckpt-format", "torch_dist", choices=("torch_dist",))
    """``torch_dist``: a DCP checkpoint stock ``torch.distributed.checkpoint`` reads."""
    save_retain_last: int | None = flag("--save-retain-last", None)
    """Keep only the newest N committed checkpoints in ``--save``."""
    verify_checksums: bool = flag("--no-verify-checkpoint-checksums", True)
    """Verify every chunk's checksum when loading; ``--no-verify-checkpoint-checksums`` skips it."""
    load_optim: bool = flag("--no-load-optim", True)
    """Load the optimizer state; ``--no-load-optim`` starts a fresh optimizer instead."""
    load_rng: bool = flag("--no-load-rng", True)
    """Load the RNG states; ``--no-load-rng`` seeds them from ``--seed`` instead."""
    finetune: bool = flag("--finetune", False)
    """Load the model's weights only and start a new run from them (as in Megatron-LM): iteration 0, data from its beginning, a fresh optimizer and RNG states from
    ``--seed``. Every restart with the flag starts over from the newest checkpoint's weights: save a
    fine-tuning run elsewhere (another ``--save``) and drop the flag to resume it."""
    trust_pickles: bool = flag("--trust-checkpoint-pickles", False)
    """Read the small state of checkpoints written before the safe format (formats 1 and 2 pickle
    it) with full unpickling: only for checkpoints you wrote
    yourself, in a directory no one else can write; unpickling runs code."""
    async_save: bool = flag("--async-save", False)
    """Asynchronous multi-level checkpointing: host memory (L0), ``--ckpt-local-dir`` (L1) and
    ``--save`` (L2)."""
    snapshot: str = flag("--ckpt-snapshot", "auto", choices=SNAPSHOT_MODES)
    """How the engine takes an L0 snapshot: ``zero-copy`` (the optimizer step
    writes each version into a pool slot: where the optimizer's state is on the host, in fp32),
    ``copy`` (copied beside the next step: a GPU's device-to-host copy), ``auto`` (zero-copy where
    it can)."""
    host_versions: int = flag("--ckpt-host-versions", 2)
    """L0: versions held in the host (shared-memory) pool."""
    host_budget_gb: float | None = flag("--ckpt-host-budget-gb", None)
    """L0: byte budget of the pool in GB; fewer versions are held if they do not fit."""
    keep_host_pool: bool = flag("--ckpt-keep-host-pool", False)
    """Keep the L0 pool in shared memory after a normal end. By default
    it is freed once the final version is committed on every level (it is RAM the next job on the
    node does not get); after a crash, an error or SIGTERM it is always kept, for recovery."""
    host_dir: str = flag("--ckpt-host-dir", SHM_DIR)
    """L0: the tmpfs directory the pool's segments live in; one per node (default ``/dev/shm``, or
    ``$GPT_CKPT_HOST_DIR`` where it is set).
    Another directory stands for another node when several launchers share one machine."""
    local_dir: str | None = flag("--ckpt-local-dir", None)
    """L1: the node-local checkpoint directory."""
    local_interval: int | None = flag("--ckpt-local-interval", None)
    """L1: flush every this many iterations."""
    local_retain_last: int = flag("--ckpt-local-retain-last", 2)
    """L1: committed checkpoints kept."""
    persistent_interval: int | None = flag("--ckpt-persistent-interval", None, derived="--save-interval")
    """L2: flush to ``--save`` every this many iterations. Not given, it is ``--save-interval``, the
    L0 interval under ``--async-save``: every version held in memory also goes to disk."""
    write_rate_limit_mb: float | None = flag("--ckpt-write-rate-limit", None, metavar="MB_PER_S")
    """L1 and L2: each rank writes at most this many MB (10^6 bytes) per second on average;
    not given: as fast as the disk goes. Bounds how much flushing
    interferes with training (and shares a parallel file system); a slower flush persists fewer
    versions, the newest first (superseded ones are skipped)."""
    peer_replicas: int = flag("--ckpt-peer-replicas", 0, metavar="K")
    """L0 peer replicas: each selected L0 version of a rank is also sent, by its flusher, to K
    partner ranks on other nodes (the same local rank on the next K nodes) and held in their host
    pools, so that a lost node resumes from memory; 0: off. Needs at least K + 1 nodes."""
    peer_interval: int | None = flag("--ckpt-peer-interval", None, derived="--save-interval")
    """L0 peer replicas: replicate every this many iterations (default: every L0 version)."""
    flusher_timeout: float = flag("--ckpt-flusher-timeout", 300.0, metavar="SECONDS")
    """Seconds this rank's checkpoint flusher process may go without a sign of life, or, while
    training waits on it, without progress, before training stops with an error naming it."""

    flusher_start: str = flag("--ckpt-flusher-start", "template", choices=FLUSHER_STARTS)
    """How each rank's flusher process starts: ``template``, forked from a copy of the trainer
    made at its start, with torch already imported (milliseconds, a few MiB of its own; where
    the trainer cannot fork safely it falls back to the next); ``interpreter``, a fresh Python
    that imports torch itself (seconds of CPU and ~145 MiB per rank)."""

    def __post_init__(self) -> None:
        if self.flusher_start not in FLUSHER_STARTS:
            raise ValueError(f"--ckpt-flusher-start must be one of {', '.join(FLUSHER_STARTS)}, "
                             f"got {self.flusher_start!r}")
        if self.snapshot not in SNAPSHOT_MODES:
            raise ValueError(f"--ckpt-snapshot must be one of {', '.join(SNAPSHOT_MODES)}, got {self.snapshot!r}")
        if self.ckpt_format != "torch_dist":
            raise ValueError(f"--ckpt-format {self.ckpt_format!r} is not supported; use torch_dist")
        for name in ("save_interval", "save_retain_last", "local_interval", "persistent_interval", "host_versions",
                     "peer_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag_name(self, name)} must be >= 1, got {value}")
        if self.ckpt_step is not None and self.ckpt_step < 0:
            raise ValueError(f"--ckpt-step must be >= 0, got {self.ckpt_step}")
        if self.local_retain_last < 1:
            raise ValueError(f"--ckpt-local-retain-last must be >= 1, got {self.local_retain_last}")
        if self.write_rate_limit_mb is not None and not 0 < self.write_rate_limit_mb < math.inf:
            raise ValueError(f"--ckpt-write-rate-limit must be > 0 MB/s, got {self.write_rate_limit_mb}")
        if self.write_rate_limit_mb is not None and not self.async_save:
            raise ValueError("--ckpt-write-rate-limit needs --async-save (it paces the engine's flushes)")
        if not 0 < self.flusher_timeout < math.inf:  # nan fails too
            raise ValueError(f"--ckpt-flusher-timeout must be a number of seconds > 0, got {self.flusher_timeout}")
        if self.host_budget_gb is not None and not 0 < self.host_budget_gb < math.inf:
            raise ValueError(f"--ckpt-host-budget-gb must be > 0, got {self.host_budget_gb}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        if self.async_save and self.save is None:
            raise ValueError("--async-save needs --save DIR (the persistent level, L2)")
        if self.finetune and self.load is None:
            raise ValueError("--finetune needs --load DIR (the checkpoint whose weights to start from)")
        if self.ckpt_step is not None and self.load is None:
            raise ValueError("--ckpt-step needs --load DIR")
        if (self.local_interval is None) != (self.local_dir is None):
            raise ValueError("--ckpt-local-dir and --ckpt-local-interval go together (L1 where and how often)")
        if self.peer_replicas < 0:
            raise ValueError(f"--ckpt-peer-replicas must be >= 0, got {self.peer_replicas}")
        if (self.peer_replicas or self.peer_interval is not None) and not self.async_save:
            raise ValueError("--ckpt-peer-replicas needs --async-save (replicas are sent by the engine's flushers)")
        if self.peer_interval is not None and not self.peer_replicas:
            raise ValueError("--ckpt-peer-interval needs --ckpt-peer-replicas K (K >= 1)")
        if self.local_dir is not None and not self.async_save:
            raise ValueError("--ckpt-local-dir needs --async-save (L1 is a level of the async engine)")
        overlap = overlapping_levels(self.save, self.local_dir, self.host_dir if self.async_save else None)
        if overlap:
            raise ValueError(overlap)

    @property
    def l2_interval(self) -> int | None:
        return self.persistent_interval or self.save_interval

    @property
    def replica_interval(self) -> int | None:
        """Iterations between replicated L0 versions (None: replicas are off)."""
        return (self.peer_interval or self.save_interval) if self.peer_replicas else None

    @property
    def loads_optimizer(self) -> bool:
        """Whether a load restores the optimizer state (not with ``--no-load-optim`` or ``--finetune``)."""
        return self.load_optim and not self.finetune

    @property
    def loads_rng(self) -> bool:
        """Whether a load restores RNG states (not with ``--no-load-rng`` or ``--finetune``)."""
        return self.load_rng and not self.finetune



def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or inside it (both resolved)."""
    return os.path.commonpath([path, directory]) == directory


def overlapping_levels(save: str | None, local_dir: str | None, host_dir: str | None) -> str | None:
    """Why the levels' directories overlap, or None. L2 (``--save``) and L1 (``--ckpt-local-dir``)
    may be neither one directory nor inside each other: each level's retention would delete the
    other's versions. L0's pool (``<--ckpt-host-dir>/gptckpt-<uid>``) may not hold either, nor
    lie inside either; a level in another directory of the same tmpfs is fine."""
    real = {name: os.path.realpath(path) for name, path in (("--save", save), ("--ckpt-local-dir", local_dir)) if path}
    if len(real) == 2:
        l2, l1 = real["--save"], real["--ckpt-local-dir"]
        if _inside(l1, l2) or _inside(l2, l1):
            how = "the same directory" if l1 == l2 else "inside one another"
            return (f"--save {save} and --ckpt-local-dir {local_dir} are {how}: L1's retention would delete L2's "
                    "checkpoints; give L1 a directory of its own (node-local, e.g. /local/ckpt)")
    if host_dir:
        host = os.path.realpath(host_dir)
        pool = os.path.join(host, f"{POOL_DIR_PREFIX}{os.getuid()}")
        for name, path in real.items():
            if _inside(path, pool) or _inside(host, path):
                return (f"--ckpt-host-dir {host_dir} (L0's pool) and {name} {save if name == '--save' else local_dir} "
                        "overlap; give each level a directory of its own")
    return None
