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

from trainer.flat_buffers import FlatParamsAndGrads


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with decoupled weight decay, gradient clipping and ZeRO-1 sharding."""

    weight_decay: float = 0.01
    """Decoupled weight decay on matrices and embeddings (``--weight-decay``)."""
    adam_beta1: float = 0.9
    """First-moment decay (``--adam-beta1``)."""
    adam_beta2: float = 0.999
    """Second-moment decay (``--adam-beta2``)."""
    adam_eps: float = 1e-8
    """Denominator epsilon (``--adam-eps``)."""
    clip_grad: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping (``--clip-grad``)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (``--use-distributed-optimizer``)."""
    shard_size_mb: float = 64.0
    """Target size of one optimizer-state shard in MiB (fp32); the unit of checkpoint fences."""
    cpu_offload: bool = False
    """Keep the fp32 main weights and Adam moments in host memory and run the Adam step there
    (``--optimizer-cpu-offload``, Megatron-LM's flag): device memory holds no optimizer state;
    each shard's gradients come down and its updated weights go up. With ``--async-save`` the
    step then writes each version straight into the host pool (zero-copy snapshots). On a CPU
    run it changes nothing."""

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
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
    decay_segments: tuple[tuple[int, int], ...]
    """Ranges (local to the shard) that get weight decay."""
    norm_segments: tuple[tuple[int, int], ...]
    """Ranges (local to the shard) whose gradients count in the global norm."""
    plain_segments: tuple[tuple[int, int], ...] = ()
    """The ranges between ``decay_segments`` (no weight decay): an out-of-place step copies them."""

    @property
    def numel(self) -> int:
        return self.end - self.start


def partition_rows(buffers: FlatParamsAndGrads, start: int, end: int, parts: int) -> list[tuple[int, int]]:
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


def cut_shards(buffers: FlatParamsAndGrads, start: int, end: int, shard_numel: int) -> list[tuple[int, int]]:
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


ShardHook = Callable[[Shard], None]


class VersionStore(Protocol):
    """Where an out-of-place step writes the new version of the state (the checkpoint engine's
    zero-copy snapshots: each version is written into a slot of the host pool, and that slot *is*
    the snapshot). ``begin`` returns the arrays to write (``fp32_param``, ``exp_avg``,
    ``exp_avg_sq``, each the length of the optimizer's range) or None for an in-place step;
    ``commit`` says the step wrote them all (they hold the current state from now on)."""

    def begin(self) -> dict[str, torch.Tensor] | None: ...

    def commit(self) -> None: ...


def _complement(segments: tuple[tuple[int, int], ...], length: int) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for a, b in segments:
        if a > at:
            out.append((at, a))
        at = b
    if at < length:
        out.append((at, length))
    return tuple(out)


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
            self.ranges = partition_rows(buffers, 0, buffers.numel, dp_size)
            self.dp_rank = dist.get_rank(dp_group)
            self.dp_global_ranks = dist.get_process_group_ranks(dp_group)
        else:
            self.ranges = [(0, buffers.numel)]
            self.dp_rank = 0
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
        shard_numel = max(1, int(config.shard_size_mb * 2**20) // 4)
        self.shards = [self._make_shard(i, lo, hi) for i, (lo, hi) in enumerate(cut_shards(buffers, self.start, self.end, shard_numel))]
        self.before_shard_update: list[ShardHook] = []
        self.versions: VersionStore | None = None
        """Set by the checkpoint engine for zero-copy snapshots: steps then write out of place."""

    def _make_shard(self, index: int, lo: int, hi: int) -> Shard:
        def local(segments):
            return tuple((a - lo, b - lo) for a, b in segments)

        decay = local(self.buffers.segments(lo, hi, lambda s: s.weight_decay))
        return Shard(
            index=index,
            start=lo,
            end=hi,
            decay_segments=decay,
            norm_segments=local(self.buffers.segments(lo, hi, lambda s: s.counts_in_grad_norm)),
            plain_segments=_complement(decay, hi - lo),
        )

    @property
    def owned_ranges(self) -> list[tuple[int, int]] | None:
        """Every DP rank's range, when the state is sharded over DP."""
        return self.ranges if self.distributed else None

    def _owned_grads(self) -> torch.Tensor:
        return self.buffers.grads[self.start : self.end]

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients, each parameter element counted once."""
        grads = self._owned_grads()
        total = torch.zeros((), dtype=torch.float32, device=grads.device)
        for shard in self.shards:
            g = grads[shard.start - self.start : shard.end - self.start]
            for a, b in shard.norm_segments:
                total += torch.dot(g[a:b], g[a:b])  # no temporary the size of the segment
        if self.distributed:
            dist.all_reduce(total, group=self.dp_group)
        dist.all_reduce(total, group=self.model_parallel_group)
        return math.sqrt(total.item())

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
        bias1 = 1.0 - cfg.adam_beta1**self.step_count
        bias2_sqrt = math.sqrt(1.0 - cfg.adam_beta2**self.step_count)
        grads = self._owned_grads()
        # Out of place (zero-copy snapshots): read the current version, write the next one into
        # the arrays the store gives; the same arithmetic, so the same bits as in place.
        out = self.versions.begin() if self.versions is not None else None
        current = (self.main_params, self.exp_avg, self.exp_avg_sq)
        new = current if out is None else (out["fp32_param"], out["exp_avg"], out["exp_avg_sq"])
        for shard in self.shards:
            for hook in self.before_shard_update:
                hook(shard)
            local = slice(shard.start - self.start, shard.end - self.start)
            grad = grads[local]
            if self._grads_come_down:  # CPU offload: this shard's gradients to the host
                grad = grad.to(self.main_params.device)
            if out is None:
                self._update(shard, local, grad, scale, lr, bias1, bias2_sqrt)
            else:
                self._update_into(new, shard, local, grad, scale, lr, bias1, bias2_sqrt)
            self.buffers.params[shard.start : shard.end].copy_(new[0][local])
        if out is not None:
            self.main_params, self.exp_avg, self.exp_avg_sq = new
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

    def _update_into(self, new, shard: Shard, local: slice, grad, scale, lr, bias1, bias2_sqrt) -> None:
        """:meth:`_update` reading the current arrays and writing ``new`` (one pass each: the
        first operation of every line writes its result where it goes)."""
        cfg = self.config
        src_p, src_m, src_v = self.main_params[local], self.exp_avg[local], self.exp_avg_sq[local]
        param, m, v = new[0][local], new[1][local], new[2][local]
        if scale != 1.0:
            grad = grad * scale
        torch.mul(src_m, cfg.adam_beta1, out=m).add_(grad, alpha=1.0 - cfg.adam_beta1)
        torch.mul(src_v, cfg.adam_beta2, out=v).addcmul_(grad, grad, value=1.0 - cfg.adam_beta2)
        if cfg.weight_decay > 0:
            for a, b in shard.decay_segments:
                torch.mul(src_p[a:b], 1.0 - lr * cfg.weight_decay, out=param[a:b])
            for a, b in shard.plain_segments:
                param[a:b].copy_(src_p[a:b])
        else:
            param.copy_(src_p)
        denom = v.sqrt().div_(bias2_sqrt).add_(cfg.adam_eps)  # one temporary, not two
        param.addcdiv_(m, denom, value=-lr / bias1)

    def _update(self, shard: Shard, local: slice, grad, scale, lr, bias1, bias2_sqrt) -> None:
        cfg = self.config
        param, m, v = self.main_params[local], self.exp_avg[local], self.exp_avg_sq[local]
        if scale != 1.0:
            grad = grad * scale
        m.mul_(cfg.adam_beta1).add_(grad, alpha=1.0 - cfg.adam_beta1)
        v.mul_(cfg.adam_beta2).addcmul_(grad, grad, value=1.0 - cfg.adam_beta2)
        if cfg.weight_decay > 0:
            for a, b in shard.decay_segments:
                param[a:b].mul_(1.0 - lr * cfg.weight_decay)
        denom = v.sqrt().div_(bias2_sqrt).add_(cfg.adam_eps)  # one temporary, not two
        param.addcdiv_(m, denom, value=-lr / bias1)
