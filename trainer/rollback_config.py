"""What a job does about rolling back while it runs: batches to skip, and rolling back past a
loss spike on its own (``trainer.live_rollback`` acts on it; ``docs/rolling-back.md`` shows it)."""

from __future__ import annotations

from dataclasses import dataclass

from cli.flags import flag, flag_name


@dataclass(frozen=True)
class RollbackConfig:
    """Megatron-LM's ``--iterations-to-skip`` and the automatic rollback past loss spikes."""

    iterations_to_skip: tuple[int, ...] = flag("--iterations-to-skip", (), nargs="+", parse=int, metavar="ITERATION")
    """Global iterations whose batches are skipped: the iteration is counted, nothing is trained on
    its batch. Recorded in checkpoints, so a resumed run skips them too (with those a rollback
    added)."""
    rollback_on_spike: bool = flag("--rollback-on-spike", False)
    """Roll back on its own, in the same processes, when the loss spikes (above --spike-factor
    times the median of the last --spike-window losses) or the loss or gradient norm is not
    finite. Needs --async-save and --save."""
    spike_factor: float = flag("--spike-factor", 3.0)
    """A loss above this many times the recent median is a spike."""
    spike_window: int = flag("--spike-window", 20)
    """How many recent losses the median is taken over; no spike is called before 5 are known."""
    rollback_distance: int = flag("--rollback-distance", 1, metavar="N")
    """Roll back to the newest version held at least N iterations before the spike."""
    skip_batches_on_rollback: bool = flag("--skip-batches-on-rollback", False)
    """After a rollback past a spike, skip the batches from the version rolled back to up to the
    spike (added to --iterations-to-skip), so the job does not replay them."""
    max_rollbacks: int = flag("--max-rollbacks", 3)
    """Rollbacks past spikes one run may make; one more spike then stops the job with an error
    (every checkpoint kept)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "iterations_to_skip", tuple(sorted(set(self.iterations_to_skip))))
        if any(i < 1 for i in self.iterations_to_skip):
            raise ValueError(f"{flag_name(self, 'iterations_to_skip')} takes iterations >= 1, "
                             f"got {list(self.iterations_to_skip)}")
        if self.spike_factor <= 1.0:
            raise ValueError(f"--spike-factor must be > 1 (a multiple of the median loss), got {self.spike_factor}")
        if self.spike_window < 5:
            raise ValueError(f"--spike-window must be >= 5 losses, got {self.spike_window}")
        if self.rollback_distance < 0:
            raise ValueError(f"--rollback-distance must be >= 0 iterations, got {self.rollback_distance}")
        if self.max_rollbacks < 0:
            raise ValueError(f"--max-rollbacks must be >= 0, got {self.max_rollbacks}")
