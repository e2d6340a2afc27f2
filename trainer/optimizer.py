"""The distributed optimizer: ZeRO-1 Adam with decoupled weight decay over flat, sharded state.

Each data-parallel rank owns one contiguous range of the flat parameter buffer (all of it when
the optimizer is not distributed). For that range it keeps fp32 main parameters and both Adam
moments in three flat buffers, cut into **shards** at parameter row boundaries so that every
piece of every parameter is a rectangle of the global tensor. The step runs shard by shard, and
calls ``before_shard_update(shard)`` hooks first: the checkpoint engine's fences go there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from cli.flags import flag, flag_name
from trainer import iteration_signals
from trainer.flat_buffers import FlatParamsAndGrads, RowGeometry


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with decoupled weight decay, gradient clipping and ZeRO-1 sharding."""

    weight_decay: float = flag("--weight-decay", 0.01)
    """Decoupled weight decay on matrices and embeddings."""
    adam_beta1: float = flag("--adam-beta1", 0.9)
    """Adam's first-moment decay."""
    adam_beta2: float = flag("--adam-beta2", 0.999)
    """Adam's second-moment decay."""
    adam_eps: float = flag("--adam-eps", 1e-8)
    """Adam's denominator epsilon."""
    clip_grad: float = flag("--clip-grad", 1.0)
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    use_distributed_optimizer: bool = flag("--use-distributed-optimizer", False)
    """ZeRO-1: shard the optimizer state over data-parallel ranks."""
    shard_size_mb: float = flag("--optimizer-shard-size-mb", 64.0)
    """Target size of one optimizer-state shard in MiB (fp32): the unit of checkpoint fences."""
    cpu_offload: bool = flag("--optimizer-cpu-offload", False)
    """Keep the fp32 main weights and Adam moments in host memory and run the Adam step there:
    device memory holds no optimizer state;
    each shard's gradients come down and its updated weights go up. With ``--async-save`` the
    step then writes each version straight into the host pool (zero-copy snapshots). On a CPU
    run it changes nothing."""

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag_name(self, name)} must be in [0, 1), got {value}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0 disables it), got {self.clip_grad}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"--optimizer-shard-size-mb must be > 0, got {self.shard_size_mb}")


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of this rank's optimizer state, ending on a parameter row boundary."""

    index: int
    """Position among this rank's shards."""
    start: int
    """First element, in flat-buffer coordinates."""
    end: int
    """One past the last element, in flat-buffer coordinates."""
    norm_segments: tuple[tuple[int, int], ...]
    """Ranges (local to the shard) whose gradients count in the global norm."""
    blocks: tuple[tuple[tuple[int, int, bool], ...], ...] = ()
    """The shard cut for the update: blocks of pieces ``(start, end, weight_decay)`` (local to
    the shard, in order, covering it). On the host an out-of-place step copies a block, then
    updates it, then publishes its weights, so that each pass finds the block in cache if the
    cache holds it."""

    @property
    def numel(self) -> int:
        return self.end - self.start


def partition_rows(buffers: RowGeometry, start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into ``parts`` near-equal ranges whose ends fall on row boundaries."""
    bounds = [start]
    for k in range(1, parts):
        target = start + round(k * (end - start) / parts)
        below = buffers.row_boundary(target)
        above = buffers.row_boundary(target, round_up=True)
        cut = below if target - below <= above - target else above
        bounds.append(min(max(cut, bounds[-1]), end))
    bounds.append(end)
    return list(zip(bounds[:-1], bounds[1:]))


def cut_shards(buffers: RowGeometry, start: int, end: int, shard_numel: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into shards of about ``shard_numel`` elements at row boundaries."""
    shards = []
    lo = start
    while lo < end:
        hi = buffers.row_boundary(min(lo + shard_numel, end))
        if hi <= lo:  # one row larger than a shard: it becomes a shard of its own
            hi = buffers.row_boundary(lo + 1, round_up=True)
        shards.append((lo, hi))
        lo = hi
    return shards


def dp_ranges(geometry: RowGeometry, distributed: bool, dp_size: int) -> list[tuple[int, int]]:
    """Every DP rank's range of the flat buffers (one range, all of it, when not distributed)."""
    return partition_rows(geometry, 0, geometry.numel, dp_size) if distributed else [(0, geometry.numel)]


def rank_shards(geometry: RowGeometry, ranges: list[tuple[int, int]], dp_rank: int,
                shard_size_mb: float) -> list[tuple[int, int]]:
    """The shards of DP rank ``dp_rank``'s range (``dp_rank`` 0 when not distributed)."""
    start, end = ranges[dp_rank]
    return cut_shards(geometry, start, end, max(1, int(shard_size_mb * 2**20) // 4))


ShardHook = Callable[[Shard], None]


class VersionStore(Protocol):
    """Where an out-of-place step writes the new version of the state (the checkpoint engine's
    zero-copy snapshots: each version is written into a slot of the host pool, and that slot *is*
    the snapshot). ``begin`` returns the arrays to write (``fp32_param``, ``exp_avg``,
    ``exp_avg_sq``, each the length of the optimizer's range) or None for an in-place step (the
    current arrays hold no version anyone reads); ``commit`` says the step is done (what it wrote
    holds the current state from now on)."""

    def begin(self) -> dict[str, torch.Tensor] | None: ...

    def commit(self) -> None: ...


def cut_blocks(decay_segments: tuple[tuple[int, int], ...], length: int, block_numel: int):
    """``[0, length)`` cut into blocks of at most ``block_numel`` elements, each a tuple of
    pieces ``(start, end, weight_decay)`` split where weight decay starts or stops."""
    edges = sorted({0, length, *(x for seg in decay_segments for x in seg)})
    decayed = [any(a <= lo and hi <= b for a, b in decay_segments) for lo, hi in zip(edges, edges[1:])]
    blocks = []
    for lo in range(0, length, block_numel):
        hi = min(length, lo + block_numel)
        blocks.append(tuple((max(a, lo), min(b, hi), d) for a, b, d in zip(edges, edges[1:], decayed) if a < hi and b > lo))
    return tuple(blocks)


# Elements per block of an update on the host: 4 MiB per array, so that a block's copy and update
# (param, moments, gradient) fit a server's L3 cache, yet large enough that the per-call overhead
# of the fused kernel does not show.
_HOST_BLOCK_NUMEL = 1 << 20


class DistributedAdam:
    """ZeRO-1 AdamW over a :class:`FlatParamsAndGrads`.

    ``dp_group``/``dp_size`` shard the state when ``config.use_distributed_optimizer``;
    ``model_parallel_group`` (TP x PP) completes the gradient norm.
    """

    def __init__(
        self,
        buffers: FlatParamsAndGrads,
        config: OptimizerConfig,
        dp_group,
        dp_size: int,
        model_parallel_group,
    ):
        self.buffers = buffers
        self.config = config
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.model_parallel_group = model_parallel_group
        self.distributed = config.use_distributed_optimizer and dp_size > 1
        if self.distributed:
            self.dp_rank = dist.get_rank(dp_group)
            self.dp_global_ranks = dist.get_process_group_ranks(dp_group)
        else:
            self.dp_rank = 0
        # From the flat layout alone: the scale simulator (benchmarks.scale) cuts with the same two
        self.ranges = dp_ranges(buffers, self.distributed, dp_size)
        cuts = rank_shards(buffers, self.ranges, self.dp_rank, config.shard_size_mb)
        self.start, self.end = self.ranges[self.dp_rank]
        owned = slice(self.start, self.end)
        # fp32 main parameters and moments of the owned range (on the host with CPU offload).
        home = torch.device("cpu") if config.cpu_offload else buffers.params.device
        self.main_params = buffers.params[owned].detach().to(device=home, dtype=torch.float32).clone()
        if home != buffers.params.device and torch.cuda.is_available():
            self.main_params = self.main_params.pin_memory()  # page-locked: the weights go up by DMA
        self.exp_avg = torch.zeros_like(self.main_params)
        self.exp_avg_sq = torch.zeros_like(self.main_params)
        self._grads_come_down = home != buffers.params.device
        self.step_count = 0
        self.skipped_steps = 0
        self.shards = [self._make_shard(i, lo, hi) for i, (lo, hi) in enumerate(cuts)]
        self.before_shard_update: list[ShardHook] = []
        self.signals: list[bool] = [False] * iteration_signals.COUNT
        """The step's flags as every rank sees them after :meth:`grad_norm` (one per
        ``trainer.iteration_signals`` slot)."""
        self.versions: VersionStore | None = None
        """Set by the checkpoint engine for zero-copy snapshots: steps then write out of place."""

    def _make_shard(self, index: int, lo: int, hi: int) -> Shard:
        def local(segments):
            return tuple((a - lo, b - lo) for a, b in segments)

        decay = local(self.buffers.segments(lo, hi, lambda s: s.weight_decay))
        # Off the host a block is the whole shard: a device kernel wants few, large launches.
        on_host = self.main_params.device.type == "cpu"
        return Shard(
            index=index,
            start=lo,
            end=hi,
            norm_segments=local(self.buffers.segments(lo, hi, lambda s: s.counts_in_grad_norm)),
            blocks=cut_blocks(decay, hi - lo, _HOST_BLOCK_NUMEL if on_host else max(hi - lo, 1)),
        )

    @property
    def owned_ranges(self) -> list[tuple[int, int]] | None:
        """Every DP rank's range, when the state is sharded over DP."""
        return self.ranges if self.distributed else None

    def _owned_grads(self) -> torch.Tensor:
        return self.buffers.grads[self.start : self.end]

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients, each parameter element counted once. The reductions
        also carry the step's flags (``trainer.iteration_signals``): :attr:`signals` after it."""
        grads = self._owned_grads()
        carried = torch.zeros(1 + self.buffers.signals.numel(), dtype=torch.float32, device=grads.device)
        total = carried[0]
        for shard in self.shards:
            g = grads[shard.start - self.start : shard.end - self.start]
            for a, b in shard.norm_segments:
                total += torch.dot(g[a:b], g[a:b])  # no temporary the size of the segment
        carried[1:] = self.buffers.signals.to(carried.device)
        if self.distributed:
            dist.all_reduce(carried, group=self.dp_group)
        dist.all_reduce(carried, group=self.model_parallel_group)
        values = carried.tolist()
        self.signals = [flag > 0 for flag in values[1:]]
        return math.sqrt(values[0])

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """One Adam step at learning rate ``lr``; returns the gradient norm before clipping.

        A non-finite norm (overflow, bad data) skips the update on every rank alike (the norm is
        global) and counts it in ``skipped_steps``: NaN never reaches the weights or moments.
        """
        cfg = self.config
        norm = self.grad_norm()
        if not math.isfinite(norm):
            self.skipped_steps += 1
            return norm
        scale = 1.0
        if cfg.clip_grad > 0 and norm > cfg.clip_grad:
            scale = cfg.clip_grad / (norm + 1e-6)
        self.step_count += 1
        home = self.main_params.device
        step = torch.tensor(float(self.step_count), device=home)
        # The fused kernel unscales gradients by dividing by this (and writes them back).
        unscale = None if scale == 1.0 else torch.tensor(1.0 / scale, device=home)
        grads = self._owned_grads()
        # Out of place (zero-copy snapshots): read the current version, write the next one into
        # the arrays the store gives; the same kernel on the same pieces, so the same bits.
        out = self.versions.begin() if self.versions is not None else None
        current = (self.main_params, self.exp_avg, self.exp_avg_sq)
        new = current if out is None else (out["fp32_param"], out["exp_avg"], out["exp_avg_sq"])
        for shard in self.shards:
            for hook in self.before_shard_update:
                hook(shard)
            local = slice(shard.start - self.start, shard.end - self.start)
            grad = grads[local]
            if self._grads_come_down:  # CPU offload: this shard's gradients to the host
                grad = grad.to(home)
            arrays, sources = [a[local] for a in new], [a[local] for a in current]
            params = self.buffers.params[shard.start : shard.end]
            for block in shard.blocks:  # each block copied (out of place), updated, published while in cache
                lo, hi = block[0][0], block[-1][1]
                if out is not None:
                    torch._foreach_copy_([a[lo:hi] for a in arrays], [a[lo:hi] for a in sources])
                self._adamw(block, arrays, grad, lr, step, unscale)
                params[lo:hi].copy_(arrays[0][lo:hi])
        if out is not None:
            self.main_params, self.exp_avg, self.exp_avg_sq = new
        if self.versions is not None:
            self.versions.commit()
        self._gather_params()
        return norm

    def _gather_params(self) -> None:
        """Every DP rank's updated range of the model parameters, to every DP rank."""
        if self.distributed:
            for owner, (a, b) in enumerate(self.ranges):
                if b > a:
                    dist.broadcast(self.buffers.params[a:b], src=self.dp_global_ranks[owner], group=self.dp_group)

    @torch.no_grad()
    def publish_main_params(self) -> None:
        """Model parameters from the main parameters (after they were restored from a snapshot)."""
        self.buffers.params[self.start : self.end].copy_(self.main_params)
        self._gather_params()

    def _adamw(self, block, arrays, grad, lr: float, step: torch.Tensor, unscale) -> None:
        """AdamW on one ``block`` of a shard, in place in ``arrays`` (param, exp_avg, exp_avg_sq,
        shard-local), with PyTorch's fused kernel (``torch.optim.AdamW(fused=True)``'s): one pass
        over each element instead of one per operation (several times faster than the same step
        written as tensor operations)."""
        cfg = self.config
        param, m, v = arrays
        for decayed, weight_decay in ((True, cfg.weight_decay), (False, 0.0)):
            pieces = [(a, b) for a, b, d in block if d == decayed]
            if pieces:
                torch._fused_adamw_(
                    [param[a:b] for a, b in pieces], [grad[a:b] for a, b in pieces],
                    [m[a:b] for a, b in pieces], [v[a:b] for a, b in pieces], [], [step] * len(pieces),
                    lr=lr, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, weight_decay=weight_decay,
                    eps=cfg.adam_eps, amsgrad=False, maximize=False, grad_scale=unscale, found_inf=None)
