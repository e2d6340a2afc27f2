"""The JSON-lines metrics file (``--metrics-file``), written and read back without a trainer."""

import json
import math
import os
from types import SimpleNamespace

import pytest

from checkpointing.engine.engine_stats import EngineStats
from trainer.metrics_file import MetricsFile, peak_resident_mib, read_metrics_file


def test_iterations_validations_and_the_summary_read_back(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    metrics = MetricsFile(str(path), enabled=True)
    metrics.iteration(5, 6.93, 3e-3, 1.25, 0.0685, 4096, 40)
    metrics.iteration(10, float("nan"), 2e-3, 1.5, 0.05, 4096, 80)
    metrics.validation(10, 7.01)
    metrics.summary(10, 10, 0.9, "cpu", False)
    metrics.close()
    records = read_metrics_file(str(path))
    first, second = records.iterations
    assert first == {"kind": "iteration", "iteration": 5, "lm_loss": 6.93, "learning_rate": 3e-3, "grad_norm": 1.25,
                     "iteration_time_ms": 68.5, "tokens_per_s": 4096 / 0.0685, "consumed_samples": 40,
                     "time": first["time"]}
    assert second["iteration"] == 10 and math.isnan(second["lm_loss"])
    assert records.validations == [{"kind": "validation", "iteration": 10, "lm_loss": 7.01}]
    assert records.summary == {"kind": "summary", "iteration": 10, "iterations_trained": 10, "train_seconds": 0.9,
                               "device": "cpu", "interrupted": False}


def test_the_engine_stall_of_each_logged_iteration(tmp_path):
    stats = EngineStats(stall_seconds=0.004, stall_by_iteration={3: 0.0015})
    checkpointer = SimpleNamespace(engine=SimpleNamespace(stats=stats))
    metrics = MetricsFile(str(tmp_path / "m.jsonl"), enabled=True)
    metrics.iteration(3, 6.9, 1e-3, 1.0, 0.01, 512, 24, checkpointer)
    metrics.iteration(4, 6.8, 1e-3, 1.0, 0.01, 512, 32, SimpleNamespace(engine=None))  # synchronous saves
    metrics.summary(4, 4, 0.04, "cpu", True, {"stall_seconds": 0.004})
    metrics.close()
    records = read_metrics_file(str(tmp_path / "m.jsonl"))
    assert records.iterations[0]["checkpoint_stall_ms"] == 1.5
    assert records.iterations[0]["checkpoint_stall_total_ms"] == 4.0
    assert "checkpoint_stall_ms" not in records.iterations[1]
    assert records.summary["interrupted"] and records.summary["checkpoint"] == {"stall_seconds": 0.004}


def test_other_ranks_and_runs_without_the_flag_write_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    for metrics in (MetricsFile(str(path), enabled=False), MetricsFile(None, enabled=True)):
        metrics.iteration(1, 6.9, 1e-3, 1.0, 0.01, 512, 8)
        metrics.summary(1, 1, 0.01, "cpu", False)
        metrics.close()
    assert not path.exists()
    assert read_metrics_file(str(path)).iterations == []


def test_a_line_cut_short_by_a_kill_is_left_out_and_a_resume_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    metrics = MetricsFile(str(path), enabled=True)
    metrics.iteration(1, 6.9, 1e-3, 1.0, 0.01, 512, 8)
    metrics.close()
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "iteration", "iteration": 2})[:15])  # killed while writing
    with open(path, "a") as f:
        f.write("\n")
    resumed = MetricsFile(str(path), enabled=True)
    resumed.iteration(2, 6.8, 1e-3, 1.0, 0.01, 512, 16)
    resumed.close()
    assert [r["iteration"] for r in read_metrics_file(str(path)).iterations] == [1, 2]


def test_every_ranks_peak_resident_memory_in_the_summary(tmp_path):
    held = b"\x01" * (64 * 2**20)  # 64 MiB, written so resident
    with open("/proc/self/status") as f:
        resident = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    assert peak_resident_mib() >= resident > 64 and held  # the high-water mark covers what is resident now
    metrics = MetricsFile(str(tmp_path / "m.jsonl"), enabled=True)
    metrics.summary(3, 3, 0.3, "cpu", False, peak_rss_mib=[812.5, 790.25])
    metrics.close()
    summary = read_metrics_file(str(tmp_path / "m.jsonl")).summary
    assert summary["peak_rss_mib"] == [812.5, 790.25] and "peak_device_mib" not in summary  # the CPU has none


def test_the_peak_device_memory_in_the_summary(tmp_path):
    """On a GPU the summary also has every rank's peak allocated device memory; on the CPU the
    trainer's gather gives none (``trainer.training._peak_memory_by_rank``)."""
    import torch

    from trainer.device import DeviceContext
    from trainer.training import _peak_memory_by_rank

    rss, device = _peak_memory_by_rank(DeviceContext(torch.device("cpu"), "gloo"))
    assert device is None and len(rss) == 1 and rss[0] > 0
    metrics = MetricsFile(str(tmp_path / "m.jsonl"), enabled=True)
    metrics.summary(3, 3, 0.3, "cuda:0", False, peak_rss_mib=[812.5], peak_device_mib=[40960.5])
    metrics.close()
    assert read_metrics_file(str(tmp_path / "m.jsonl")).summary["peak_device_mib"] == [40960.5]


def test_report_files_are_never_written_through_a_planted_link(tmp_path):
    """A metrics or trace file name someone linked elsewhere (``fs.protected_symlinks=0`` hosts
    follow links in sticky directories) is refused, and the link's target is left as it was."""
    from checkpointing.base.private_files import UnsafePathError
    from checkpointing.base.trace import Tracer

    target = tmp_path / "victim"
    target.write_text("precious")
    for name in ("metrics.jsonl", "rank0.json"):
        os.symlink(target, tmp_path / name)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        MetricsFile(str(tmp_path / "metrics.jsonl"), True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        Tracer(0).write(str(tmp_path / "rank0.json"))
    assert target.read_text() == "precious"
