"""What trying one checkpoint came to, and how the ranks agree on it before acting.

Every rank tries the same candidate; each meets one :class:`Outcome`. The gravest outcome any
rank met is the job's: one rank's damaged file makes the candidate damaged for all, one rank's
mismatch stops every rank. The load policy (``checkpointing.recovery.loading``) acts on the agreed
outcome only, so every rank takes the same branch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    """One rank's outcome of trying one candidate, from the mildest to the gravest."""

    LOADED = 0
    """Read whole; the state holds it."""
    OTHER_LAYOUT = 1
    """Passed over, nothing wrong with it: a node-local checkpoint saved in another layout (a node
    holds only its own ranks' files, which fit only the layout that wrote them)."""
    WEIGHTS_ONLY = 2
    """Passed over, nothing wrong with it: a node-local checkpoint restores the optimizer state,
    and this run reads the weights alone (``--no-load-optim``, ``--finetune``) from the shared level."""
    DAMAGED = 3
    """Its bytes differ from what was written (flipped, truncated, missing): reported, and the
    next candidate tried (an error with ``--ckpt-step``); nothing is deleted."""
    UNTRUSTED = 4
    """A file would run code to be read: the run stops, someone must look."""
    MISMATCH = 5
    """It holds another model: the run stops (an older checkpoint would be another model too)."""

    @property
    def passed_over(self) -> bool:
        """Not for this run, and not damaged: the next candidate is tried without a warning."""
        return self in (Outcome.OTHER_LAYOUT, Outcome.WEIGHTS_ONLY)


@dataclass(frozen=True)
class Attempt:
    """One rank's try of one candidate."""

    outcome: Outcome
    reason: str = ""
    """Why it was not loaded, naming the file and what to do (empty when loaded)."""


def agree(attempts: list[Attempt]) -> Attempt:
    """The job's outcome from every rank's attempt (in rank order): the gravest. Its reason is
    the first rank's when the candidate was passed over (every rank passes it over for the same
    reason), else every rank's that did not load it, each named."""
    worst = max((a.outcome for a in attempts), key=lambda outcome: outcome.value)
    if worst is Outcome.LOADED:
        return Attempt(Outcome.LOADED)
    failed = [(rank, a) for rank, a in enumerate(attempts) if a.outcome is not Outcome.LOADED]
    if worst.passed_over:
        return Attempt(worst, next(a.reason for _, a in failed if a.outcome is worst))
    return Attempt(worst, "; ".join(f"rank {rank}: {a.reason}" for rank, a in failed))
