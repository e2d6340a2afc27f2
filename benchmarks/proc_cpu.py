"""CPU accounting from ``/proc``: what each thread of this process used. The machine's idle and
steal shares come from ``checkpointing.engine.engine_stats`` (``machine_cpu_times``, ``idle_and_steal``),
which the trainer's end-of-run summary reads too."""

from __future__ import annotations

import os


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) this process's threads used so far, summed by thread name
    (the training thread is the process's name; OpenMP workers share one name)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                text = f.read()
        except FileNotFoundError:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out

