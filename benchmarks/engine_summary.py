"""The checkpoint engine's counters of a trainer run (rank 0's numbers in its metrics file's
summary, ``checkpointing.engine.run_report.rank_numbers``), summed up for the GPU bench's report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineSummary:
    """The engine's counters from rank 0's summary numbers; None where the trainer's
    version does not write the field yet."""

    stall_ms: float
    fence_waits: int
    snapshots: int
    requests: int | None
    request_ms: float | None
    state_gb: float | None
    state_gb_estimated: bool
    blocked_ms_per_gb_per_request: float | None
    copy_gbps: float | None
    flushes: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    stall_by_iteration_ms: dict[int, float] = field(default_factory=dict)


def engine_summary(stats: dict, estimated_state_bytes: int) -> EngineSummary:
    state_bytes = stats.get("state_bytes")
    estimated = state_bytes is None
    if estimated:
        state_bytes = estimated_state_bytes
    gb = state_bytes / 1e9 if state_bytes else None
    requests = stats.get("requests")
    request_s = stats.get("request_seconds")
    snapshots = int(stats.get("snapshots", 0))
    per_gb = None
    if request_s is not None and requests and gb:
        per_gb = request_s * 1000 / requests / gb
    copy_gbps = None
    copy_s = stats.get("copy_seconds")
    if copy_s and snapshots and gb:
        copy_gbps = gb * snapshots / copy_s
    flushes: dict[str, dict] = {}
    for f in stats.get("flushes", []):
        level = flushes.setdefault(f["level"], {"ok": 0, "failed": 0, "bytes": 0, "seconds": []})
        if f.get("error"):
            level["failed"] += 1
        else:
            level["ok"] += 1
            level["bytes"] += f["bytes"]
            level["seconds"].append(f["seconds"])
    return EngineSummary(
        stall_ms=stats.get("stall_seconds", 0.0) * 1000, fence_waits=int(stats.get("fence_waits", 0)),
        snapshots=snapshots, requests=requests, request_ms=None if request_s is None else request_s * 1000,
        state_gb=gb, state_gb_estimated=estimated, blocked_ms_per_gb_per_request=per_gb, copy_gbps=copy_gbps,
        flushes=flushes, skipped=dict(stats.get("skipped", {})),
        stall_by_iteration_ms={int(k): v * 1000 for k, v in stats.get("stall_by_iteration", {}).items()},
    )
