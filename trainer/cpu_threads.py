"""How the CPU's OpenMP threads wait, decided before torch loads (so: no torch import here).

Training on CPU runs torch's intra-op OpenMP team on every core. By default its threads spin
after each parallel region, waiting for the next one. The checkpoint engine's copy and flush
threads then preempt a spinning or working team member, and the rest of the team spins at the
next barrier until it is scheduled again: on 2 cores a background copy of ~0.1 s per iteration
cost training +8-12% this way, and +0% with passive waits (``results/bench_checkpoint_cpu.md``,
2026-11-27). On a more loaded day (2026-11-30) passive waits made training alone 7-18% slower,
and the engine was still slightly faster with them than with the default (L0 +9.7% against
+11.9% of training with the default). So with ``--async-save`` the team waits passively, unless
the user chose a policy.
"""

from __future__ import annotations

import os

VARIABLE = "OMP_WAIT_POLICY"


def prefer_passive_omp_waits(argv: list[str], environ=os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when ``--async-save`` is in ``argv`` and the variable is
    unset; returns whether it was set. Must run before torch is imported (OpenMP reads it once)."""
    if "--async-save" in argv and VARIABLE not in environ:
        environ[VARIABLE] = "PASSIVE"
        return True
    return False
