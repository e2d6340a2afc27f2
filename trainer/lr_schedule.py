"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay to ``min_lr``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cli.flags import flag

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRScheduleConfig:
    """Megatron-LM's LR schedule, in iterations."""

    lr: float = flag("--lr", required=True)
    """Peak learning rate."""
    min_lr: float = flag("--min-lr", 0.0)
    """Floor of the learning rate after decay."""
    warmup_iters: int = flag("--lr-warmup-iters", 0)
    """Iterations of linear warmup from 0 to ``--lr``."""
    decay_iters: int = flag("--lr-decay-iters", 1, derived="--train-iters")
    """Iteration at which decay reaches ``--min-lr``."""
    decay_style: str = flag("--lr-decay-style", "linear", choices=DECAY_STYLES)
    """How the learning rate decays after warmup: ``constant``, ``linear`` or ``cosine``."""
    override_scheduler: bool = flag("--override-opt_param-scheduler", False)
    """On resume, this run's schedule flags replace the checkpoint's where they differ (Megatron-LM's
    flag). Without it or ``--use-checkpoint-opt_param-scheduler``, a schedule that differs is refused."""
    use_checkpoint_scheduler: bool = flag("--use-checkpoint-opt_param-scheduler", False)
    """On resume, the checkpoint's schedule replaces this run's flags where they differ (Megatron-LM's flag)."""

    def __post_init__(self) -> None:
        if self.override_scheduler and self.use_checkpoint_scheduler:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler contradict each "
                             "other: give one")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.lr}], got {self.min_lr}")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        if self.warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.warmup_iters}")
        if self.decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {self.decay_iters}")
        if self.warmup_iters > self.decay_iters:
            raise ValueError(
                f"--lr-warmup-iters {self.warmup_iters} exceeds --lr-decay-iters {self.decay_iters}"
            )


SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_iters", "decay_iters", "decay_style")
"""What a resume compares with the checkpoint's schedule (Megatron-LM compares the same)."""


def schedule_differences(saved: dict, current: LRScheduleConfig) -> dict[str, tuple]:
    """``{field: (saved, now)}`` of the schedule fields ``saved`` (a checkpoint's recorded ``lr``
    section) gives otherwise than ``current``; fields it does not record are not compared."""
    return {name: (saved[name], getattr(current, name)) for name in SCHEDULE_FIELDS
            if name in saved and saved[name] != getattr(current, name)}


def learning_rate(cfg: LRScheduleConfig, iteration: int) -> float:
    """LR used by the optimizer step of ``iteration`` (1-based). A pure function: resumable."""
    if cfg.warmup_iters > 0 and iteration <= cfg.warmup_iters:
        return cfg.lr * iteration / cfg.warmup_iters
    if cfg.decay_style == "constant":
        return cfg.lr
    if iteration >= cfg.decay_iters:
        return cfg.min_lr
    ratio = (iteration - cfg.warmup_iters) / (cfg.decay_iters - cfg.warmup_iters)
    if cfg.decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
