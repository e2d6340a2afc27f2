"""A per-rank timeline of training and checkpoint phases in Chrome trace format (Perfetto).

Spans are complete events (``"ph": "X"``) on one clock (``time.perf_counter_ns``), tagged with
the thread that ran them; the flusher process's spans (sent back with each flush) show on a
track of their own beside the training thread's. Memory is bounded: the newest ``max_events`` spans are kept.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time

from checkpointing.base.private_files import open_own


class Tracer:
    """Records spans; ``write(path)`` saves them as Chrome trace JSON."""

    def __init__(self, rank: int, max_events: int = 200_000):
        self.rank = rank
        self.events: collections.deque = collections.deque(maxlen=max_events)
        self._thread_names: dict[int, str] = {}

    @contextlib.contextmanager
    def span(self, name: str, category: str, **args):
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.complete(name, category, start, time.perf_counter_ns(), **args)

    def complete(self, name: str, category: str, start_ns: int, end_ns: int, **args) -> None:
        tid = threading.get_native_id()
        if tid not in self._thread_names:
            self._thread_names[tid] = threading.current_thread().name
        event = {"name": name, "cat": category, "ph": "X", "ts": start_ns / 1000, "dur": (end_ns - start_ns) / 1000,
                 "pid": self.rank, "tid": tid}
        if args:
            event["args"] = args
        self.events.append(event)

    def complete_on(self, track: str, name: str, category: str, start_ns: int, end_ns: int, **args) -> None:
        """A span another process ran (the flusher), on a track of its own named ``track``."""
        tid = 1_000_000 + sum(track.encode()) % 1000  # not a thread id of this process
        self._thread_names.setdefault(tid, track)
        event = {"name": name, "cat": category, "ph": "X", "ts": start_ns / 1000, "dur": (end_ns - start_ns) / 1000,
                 "pid": self.rank, "tid": tid}
        if args:
            event["args"] = args
        self.events.append(event)

    def phase_hook(self, category: str = "train"):
        """A ``phase(name)`` context-manager factory for the training loop and pipeline schedule."""
        return lambda name: self.span(name, category)

    def write(self, path: str) -> None:
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}}
                 for tid, name in self._thread_names.items()]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open_own(path, "w") as f:  # never through a planted link
            json.dump({"traceEvents": meta + list(self.events), "displayTimeUnit": "ms"}, f)


class NullTracer:
    """Records nothing (no ``--trace-dir``): spans cost one call."""

    @contextlib.contextmanager
    def span(self, name: str, category: str, **args):
        yield

    def complete(self, *args, **kwargs) -> None:
        pass

    def complete_on(self, *args, **kwargs) -> None:
        pass
