"""The end-of-run checkpointing summary, as pure functions over gathered numbers.

Each rank puts its numbers in one dict (:func:`rank_numbers`: plain builtins, so it gathers over
the checkpoint group and is written as JSON beside a trace); the logging rank turns every rank's
dicts into the summary's lines (:func:`summary_lines`). Nothing here reads a clock, a file or a
process group: the same numbers give the same lines.
"""

from __future__ import annotations

from typing import Any

from checkpointing.engine.engine_stats import EngineStats


def rank_numbers(rank: int, stats: EngineStats, process_cpu_seconds: float,
                 iteration_seconds: dict[bool, list[float]], state_bytes: int) -> dict[str, Any]:
    """This rank's numbers for the summary. ``iteration_seconds``: wall time from one step to the
    next, by whether checkpoint work ran in that time."""
    return {"rank": rank, "stall_seconds": stats.stall_seconds,
            "training_thread_seconds": stats.training_thread_seconds, "flusher_cpu_seconds": stats.flusher_cpu_seconds,
            "flusher_start_seconds": stats.flusher_start_seconds, "flusher_rss_bytes": stats.flusher_rss_bytes,
            "flusher_start_cpu_seconds": stats.flusher_start_cpu_seconds,
            "fence_seconds": stats.fence_seconds,
            "process_cpu_seconds": process_cpu_seconds,
            "iteration_seconds": {str(k): v for k, v in iteration_seconds.items()},
            "stall_by_iteration": {str(k): v for k, v in sorted(stats.stall_by_iteration.items())},
            "fence_waits": stats.fence_waits, "snapshots": stats.copies,
            "requests": stats.requests, "request_seconds": stats.request_seconds,
            "copy_seconds": stats.copy_seconds,
            "state_bytes": state_bytes,
            "flushes": [vars(f) for f in stats.flushes], "skipped": dict(stats.skipped)}


def summary_lines(everyone: list[dict], mine: dict, levels: list[str], train_seconds: float, zero_copy: bool,
                  bytes_copied: int, machine: tuple[float, float] | None, cpus: int | None) -> list[str]:
    """Total stall (worst rank) and its share of training, what checkpointing cost beyond it,
    flushes per level, the slowest level.

    ``everyone``: every rank's :func:`rank_numbers`, in rank order (the first is the logging
    rank's clock); ``mine``: the reporting rank's; ``levels``: the engine's level names;
    ``bytes_copied``: the reporting rank's snapshot copies; ``machine``: the machine's idle and
    steal shares over the run (None: unknown); ``cpus``: the machine's CPU count."""
    worst = max(everyone, key=lambda m: m["stall_seconds"])
    share = 100 * worst["stall_seconds"] / train_seconds if train_seconds else 0.0
    lines = [f"> checkpointing summary: training blocked {worst['stall_seconds'] * 1000:.1f} ms in all on the "
             f"worst rank ({worst['rank']}), {share:.2f}% of {train_seconds:.1f} s of training; "
             f"{sum(m['fence_waits'] for m in everyone)} fence waits; {mine['snapshots']} snapshots (L0, "
             f"{'zero-copy' if zero_copy else 'copied'}: {bytes_copied / 1e9:.3f} GB copied)"]
    lines += cost_lines(everyone, machine, cpus)
    lines += level_lines(everyone, levels, mine["skipped"])
    return lines


def cost_lines(everyone: list[dict], machine: tuple[float, float] | None, cpus: int | None) -> list[str]:
    """What checkpointing cost training, beyond the time it blocked it: the training thread's
    time in the engine (the training process runs no checkpoint thread), the flusher
    processes' CPU, the machine's idle and steal share, and iteration time beside checkpoint
    work against iterations without any, where the run has both."""
    mine = max(everyone, key=lambda m: m["training_thread_seconds"])
    share = 100 * mine["training_thread_seconds"] / max(mine["process_cpu_seconds"], 1e-9)
    lines = [f"  training process: {mine['training_thread_seconds'] * 1000:.1f} ms in request and fences on rank "
             f"{mine['rank']} ({share:.2f}% of the {mine['process_cpu_seconds']:.1f} s of CPU its process used), "
             "no checkpoint thread"]
    flusher = max(everyone, key=lambda m: m["flusher_cpu_seconds"])
    per_it = 1000 * flusher["flusher_cpu_seconds"] / max(flusher["requests"], 1)
    start = max(m["flusher_start_seconds"] for m in everyone)
    start_cpu = max(m["flusher_start_cpu_seconds"] for m in everyone)
    rss = max(m["flusher_rss_bytes"] for m in everyone)
    lines.append(f"  flusher processes: {flusher['flusher_cpu_seconds']:.2f} s of CPU on rank {flusher['rank']} "
                 f"({per_it:.1f} ms per request, the final save included); up in {start:.1f} s "
                 f"({start_cpu:.1f} s of CPU), {rss / 2**20:.0f} MiB unshared resident (worst rank)")
    if machine is not None:
        lines.append(f"  machine: {100 * machine[0]:.1f}% idle, {100 * machine[1]:.1f}% stolen by the hypervisor "
                     f"over the run ({cpus} CPUs; what the flushers took is idle the machine no longer had)")
    logging = everyone[0]["iteration_seconds"]  # the logging rank's clock
    beside, alone = sorted(logging["True"]), sorted(logging["False"])
    if beside and len(alone) >= 3:
        median_beside, median_alone = beside[len(beside) // 2], alone[len(alone) // 2]
        lines.append(f"  iteration time: median {median_beside * 1000:.1f} ms beside checkpoint work ({len(beside)} "
                     f"iterations) against {median_alone * 1000:.1f} ms without ({len(alone)}): "
                     f"{100 * (median_beside / median_alone - 1):+.1f}%")
    elif beside:
        lines.append(f"  iteration time: all {len(beside)} iterations ran beside checkpoint work; what it costs "
                     "shows against a run without --async-save (scripts/bench_checkpoint.py measures both)")
    return lines


def level_lines(everyone: list[dict], levels: list[str], skipped: dict[str, int]) -> list[str]:
    """Per level: versions committed, bytes, the slowest flush, the bandwidth over every rank,
    versions superseded (``skipped``: the reporting rank's count) and flushes failed; then the
    slowest level."""
    lines = []
    slowest = None
    for level in levels:
        done = [f for m in everyone for f in m["flushes"] if f["level"] == level and f["error"] is None]
        failed = sum(1 for m in everyone for f in m["flushes"] if f["level"] == level and f["error"])
        versions = len({f["version"] for f in done})
        nbytes = sum(f["bytes"] for f in done)
        seconds = max((f["seconds"] for f in done), default=0.0)
        rate = nbytes / max(sum(f["seconds"] for f in done), 1e-9) / 1e9 * len(everyone) if done else 0.0
        lines.append(f"  {level}: {versions} checkpoints, {nbytes / 1e9:.3f} GB written, slowest flush {seconds:.2f} s, "
                     f"~{rate:.2f} GB/s, {skipped.get(level, 0)} superseded, {failed} failed (rank-flushes)")
        if done and (slowest is None or rate < slowest[1]):
            slowest = (level, rate)
    if slowest:
        lines.append(f"  slowest level: {slowest[0]} (~{slowest[1]:.2f} GB/s)")
    return lines
