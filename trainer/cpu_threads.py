"""How the CPU's OpenMP threads wait, decided before torch loads (so: no torch import here).

Training on CPU runs torch's intra-op OpenMP team on every core. By default its threads spin
after each parallel region, waiting for the next one. A background copy thread then preempts a
spinning or working team member, and the rest of the team spins at the next barrier until it is
scheduled again: on 2 cores a background copy of ~0.1 s per iteration cost training +8-12% this
way, and +0% with passive waits (``results/bench_checkpoint_cpu.md``, 2026-11-27). Passive waits
cost training itself, though: +4% to +18% on the days measured.

Zero-copy snapshots (the default on a CPU with fp32 weights, ``--ckpt-snapshot auto``) have no
copy thread: the optimizer step writes the snapshot. There, on 2026-12-01, the engine with L0
every iteration cost +6.0% with OpenMP's default and +13.6% with passive waits (+9.1% against
passive training). So the team waits passively only where a copy thread runs beside training:
``--async-save`` with ``--ckpt-snapshot copy`` or ``--bf16`` (whose snapshots are copied),
unless the user chose a policy.
"""

from __future__ import annotations

import os

VARIABLE = "OMP_WAIT_POLICY"


def _copies_snapshots(argv: list[str]) -> bool:
    """Whether the engine will copy its snapshots beside training (not zero-copy)."""
    if "--bf16" in argv:
        return True
    for i, arg in enumerate(argv):
        if arg == "--ckpt-snapshot" and i + 1 < len(argv):
            return argv[i + 1] == "copy"
        if arg.startswith("--ckpt-snapshot="):
            return arg.split("=", 1)[1] == "copy"
    return False


def prefer_passive_omp_waits(argv: list[str], environ=os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when ``argv`` runs the engine with copied snapshots
    (``--async-save`` and ``--ckpt-snapshot copy`` or ``--bf16``) and the variable is unset;
    returns whether it was set. Must run before torch is imported (OpenMP reads it once)."""
    if "--async-save" in argv and _copies_snapshots(argv) and VARIABLE not in environ:
        environ[VARIABLE] = "PASSIVE"
        return True
    return False
