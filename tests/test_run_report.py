"""The end-of-run checkpointing summary from given numbers: every line, to the letter."""

from checkpointing.engine.engine_stats import EngineStats, FlushRecord
from checkpointing.engine.run_report import level_lines, rank_numbers, summary_lines


def _rank(rank, stall, thread, flusher_cpu, flushes, beside=(), alone=(), skipped=None):
    return {"rank": rank, "stall_seconds": stall, "training_thread_seconds": thread, "flusher_cpu_seconds": flusher_cpu,
            "flusher_start_seconds": 1.5 + rank, "flusher_rss_bytes": (150 + 10 * rank) * 2**20,
            "flusher_start_cpu_seconds": 1.2, "fence_seconds": 0.0, "process_cpu_seconds": 20.0,
            "iteration_seconds": {"True": list(beside), "False": list(alone)}, "stall_by_iteration": {},
            "fence_waits": 2 * rank, "snapshots": 10, "requests": 10, "request_seconds": thread, "copy_seconds": 0.0,
            "state_bytes": 10**9, "flushes": flushes, "skipped": skipped or {}}


def _flush(level, version, nbytes, seconds, error=None):
    return {"level": level, "version": version, "bytes": nbytes, "seconds": seconds, "error": error}


def test_the_summary_of_two_ranks():
    everyone = [
        _rank(0, 0.010, 0.050, 2.0, [_flush("L1", 5, 10**9, 1.0), _flush("L2", 10, 10**9, 2.0)],
              beside=[0.12, 0.11, 0.13], alone=[0.10, 0.10, 0.10, 0.09], skipped={"L2": 3}),
        _rank(1, 0.030, 0.040, 3.0, [_flush("L1", 5, 10**9, 1.0), _flush("L2", 10, 0, 0.5, error="No space left")]),
    ]
    lines = summary_lines(everyone, everyone[0], ["L1", "L2"], train_seconds=10.0, zero_copy=True, bytes_copied=0,
                          machine=(0.25, 0.01), cpus=2)
    assert lines == [
        "> checkpointing summary: training blocked 30.0 ms in all on the worst rank (1), 0.30% of 10.0 s of training; "
        "2 fence waits; 10 snapshots (L0, zero-copy: 0.000 GB copied)",
        "  training process: 50.0 ms in request and fences on rank 0 (0.25% of the 20.0 s of CPU its process used), "
        "no checkpoint thread",
        "  flusher processes: 3.00 s of CPU on rank 1 (300.0 ms per request, the final save included); up in 2.5 s "
        "(1.2 s of CPU), 160 MiB unshared resident (worst rank)",
        "  machine: 25.0% idle, 1.0% stolen by the hypervisor over the run (2 CPUs; what the flushers took is idle the "
        "machine no longer had)",
        "  iteration time: median 120.0 ms beside checkpoint work (3 iterations) against 100.0 ms without (4): +20.0%",
        "  L1: 1 checkpoints, 2.000 GB written, slowest flush 1.00 s, ~2.00 GB/s, 0 superseded, 0 failed (rank-flushes)",
        "  L2: 1 checkpoints, 1.000 GB written, slowest flush 2.00 s, ~1.00 GB/s, 3 superseded, 1 failed (rank-flushes)",
        "  slowest level: L2 (~1.00 GB/s)",
    ]


def test_without_a_machine_reading_or_iterations_apart():
    everyone = [_rank(0, 0.0, 0.001, 0.1, [], beside=[0.1, 0.1])]
    lines = summary_lines(everyone, everyone[0], ["L2"], train_seconds=0.0, zero_copy=False, bytes_copied=3 * 10**9,
                          machine=None, cpus=None)
    assert lines[0].endswith("0.00% of 0.0 s of training; 0 fence waits; 10 snapshots (L0, copied: 3.000 GB copied)")
    assert not any(line.startswith("  machine:") for line in lines)
    assert "  iteration time: all 2 iterations ran beside checkpoint work; what it costs shows against a run without " \
           "--async-save (scripts/bench_checkpoint.py measures both)" in lines
    assert lines[-1] == "  L2: 0 checkpoints, 0.000 GB written, slowest flush 0.00 s, ~0.00 GB/s, 0 superseded, " \
                        "0 failed (rank-flushes)"
    assert level_lines(everyone, [], {}) == []


def test_rank_numbers_are_plain_builtins_of_the_engine_counters():
    stats = EngineStats(stall_seconds=0.5, stall_by_iteration={3: 0.5}, fence_waits=1, copies=2, requests=2,
                        request_seconds=0.2, fence_seconds=0.1, flushes=[FlushRecord("L2", 2, 100, 0.1, None, 0.25)])
    stats.skipped["L2"] += 1
    numbers = rank_numbers(4, stats, 12.0, {True: [0.2], False: [0.1]}, 1000)
    assert numbers["rank"] == 4 and numbers["training_thread_seconds"] == stats.training_thread_seconds
    assert numbers["iteration_seconds"] == {"True": [0.2], "False": [0.1]}
    assert numbers["stall_by_iteration"] == {"3": 0.5} and numbers["skipped"] == {"L2": 1}
    assert numbers["flushes"] == [{"level": "L2", "version": 2, "bytes": 100, "seconds": 0.1, "error": None,
                                   "flusher_cpu_seconds": 0.25}]
    assert numbers["snapshots"] == 2 and numbers["process_cpu_seconds"] == 12.0 and numbers["state_bytes"] == 1000
