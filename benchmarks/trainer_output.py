"""What a trainer run left for a bench: its numbers from its ``--metrics-file`` (every logged
iteration's time and loss, the device it ran on), and from its console only the lines a report
shows as they were printed (what it built, its checkpoint notes, its end-of-run summary)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from trainer.metrics_file import read_metrics_file

SUMMARY_START = "> checkpointing summary"
"""The first line of the trainer's end-of-run checkpointing summary; its lines follow, indented."""


@dataclass
class ParsedLog:
    iteration_ms: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    device: str | None = None
    """The device the run's summary names (None: the run did not reach its end)."""
    checkpoint: dict | None = None
    """The numbers of the run's end-of-run checkpointing summary (None: no engine, or no end)."""
    peak_device_mib: list[float] | None = None
    """Every rank's peak allocated GPU memory, from the run's summary (None: on the CPU, or no end)."""
    describe: str | None = None
    """The trainer's "> training GPT: ..." line."""
    checkpoint_notes: list[str] = field(default_factory=list)
    """The trainer's "> checkpoint: ..." lines (what a load could not restore, among others)."""
    summary: list[str] = field(default_factory=list)
    """The trainer's end-of-run lines: the checkpointing summary and what follows it."""


def summary_lines(lines: list[str]) -> list[str]:
    """The console's end-of-run lines: the checkpointing summary with its indented lines, the
    trace note and "> training done"."""
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith(SUMMARY_START):
            out = [line]
            for follow in lines[i + 1:]:  # the next "> ..." line ends it
                if not follow.startswith("  "):
                    break
                out.append(follow)
        elif line.startswith("> training done") or line.startswith("> trace of every rank"):
            out.append(line)
    return out


def parse_run(console: str, metrics_path: str | None) -> ParsedLog:
    """A run's numbers from its metrics file, its shown lines from its console text."""
    parsed = ParsedLog()
    if metrics_path:
        records = read_metrics_file(metrics_path)
        for record in records.iterations:
            parsed.iteration_ms[record["iteration"]] = record["iteration_time_ms"]
            parsed.loss[record["iteration"]] = record["lm_loss"]
        if records.summary is not None:
            parsed.device = records.summary["device"]
            parsed.checkpoint = records.summary.get("checkpoint")
            parsed.peak_device_mib = records.summary.get("peak_device_mib")
    lines = console.splitlines()
    parsed.describe = next((line.strip() for line in lines if line.startswith("> training GPT:")), None)
    parsed.checkpoint_notes = [line[2:].strip() for line in lines if line.startswith("> checkpoint:")]
    parsed.summary = summary_lines(lines)
    return parsed


def median_ms(parsed: ParsedLog, first: int) -> float | None:
    """Median iteration time over iterations ``first``.. (the earlier ones warm up)."""
    times = [ms for it, ms in parsed.iteration_ms.items() if it >= first]
    return statistics.median(times) if times else None
