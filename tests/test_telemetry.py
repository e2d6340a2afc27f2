"""Stall timelines: TensorBoard scalars checked against the engine's own counters, the per-rank
Chrome trace, the end-of-run summary, and the charts rendered by TensorBoard in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from checkpointing.storage import host_pool
from tests.browser import Chromium, find_chromium
from tests.helpers import free_port
from tests.launch import ROOT, TINY, run_pretrain

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--lr", "3e-3", "--log-interval", "5", "--train-iters", "12", "--use-distributed-optimizer",
               "--optimizer-shard-size-mb", "0.1", "--async-save", "--save-interval", "1",
               "--ckpt-persistent-interval", "5"]
SCREENSHOT = ROOT / "docs" / "tensorboard-checkpoint-stall.png"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Held (``GPT_CKPT_HOLD=flush``, checkpointing/engine/pacing.py), so that what is checked does not
    depend on the machine's speed: zero-copy snapshots in 2 slots, every version flushed to L1,
    and each flush starts writing its slot only once a step is blocked in a fence on that slot, so
    every step from the third stalls at a fence on every rank, and nothing is superseded (L2 gets
    5, 10 and the final 12)."""
    base = tmp_path_factory.mktemp("telemetry")
    proc = run_pretrain(ARGS + ["--save", str(base / "ckpt"), "--tensorboard-dir", str(base / "tb"),
                                "--ckpt-local-dir", str(base / "local"), "--ckpt-local-interval", "1",
                                "--ckpt-host-versions", "1", "--trace-dir", str(base / "trace"),
                                "--ckpt-snapshot", "zero-copy", "--metrics-file", str(base / "metrics.jsonl")],
                        nproc=2, env={"GPT_CKPT_HOLD": "flush"})
    yield base, proc.stdout
    host_pool.remove_segments(str(base / "ckpt"))


def test_tensorboard_stall_equals_the_engines_counters(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _ = run
    acc = EventAccumulator(str(base / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("checkpoint/stall-ms", "checkpoint/stall-rank", "checkpoint/fence-waits", "checkpoint/snapshot-copy-ms",
                "checkpoint/pool-occupancy", "checkpoint/flush-GBps-L1", "checkpoint/flush-GBps-L2",
                "checkpoint/bytes-L2", "checkpoint/flusher-cpu-ms", "checkpoint/training-thread-ms", "iteration-time"):
        assert tag in scalars, tag
    assert "checkpoint/stall-per-shard-ms" in acc.Tags()["histograms"]
    stats = [json.loads((base / "trace" / f"checkpoint-stats-rank{r}.json").read_text()) for r in range(2)]
    stall = {e.step: e.value for e in acc.Scalars("checkpoint/stall-ms")}
    rank = {e.step: e.value for e in acc.Scalars("checkpoint/stall-rank")}
    assert sorted(stall) == list(range(1, 13))
    for it in range(1, 13):
        per_rank = [1000 * s["stall_by_iteration"].get(str(it), 0.0) for s in stats]
        assert stall[it] == pytest.approx(max(per_rank), rel=1e-5, abs=1e-4), it
        if max(per_rank) > 0:
            assert per_rank[int(rank[it])] == max(per_rank)
    assert all(s["fence_waits"] >= 10 for s in stats), "the held flushes make every rank's steps 3-12 wait"
    assert sum(stall.values()) > 0
    waits = {e.step: e.value for e in acc.Scalars("checkpoint/fence-waits")}
    assert sum(waits.values()) == sum(s["fence_waits"] for s in stats)
    total_bytes = {e.step: e.value for e in acc.Scalars("checkpoint/bytes-L2")}
    l2 = [(f["version"], f["bytes"]) for s in stats for f in s["flushes"] if f["level"] == "L2" and f["error"] is None]
    assert sorted({v for v, _ in l2}) == [5, 10, 12], l2  # every due version, and the final save
    # TensorBoard has the flushes done by the last step's report: 5 (flushed at step 7's fences),
    # maybe 10 (step 12's), never 12 (flushed at the end).
    reported = sum(total_bytes.values())
    assert any(reported == pytest.approx(sum(b for v, b in l2 if v in done), rel=1e-6) for done in ({5}, {5, 10})), \
        (reported, l2)


def test_trace_has_training_and_checkpoint_phases_on_one_clock(run):
    base, _ = run
    for r in range(2):
        trace = json.loads((base / "trace" / f"rank{r}.json").read_text())
        events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        names = {e["name"] for e in events}
        assert {"forward", "backward", "optimizer", "checkpoint request", "flush L1", "flush L2",
                "write L2"} <= names, names
        assert any(n.startswith("fence wait shard") for n in names)
        flushes = [e for e in events if e["name"].startswith("flush ")]
        tracks = {e["tid"] for e in flushes}  # the flusher process's spans, on a track of their own
        assert len(tracks) == 1 and tracks != {e["tid"] for e in events if e["name"] == "forward"}
        names_of = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
        assert names_of[tracks.pop()] == "ckpt-flusher"
        forwards = [e for e in events if e["name"] == "forward"]
        assert min(e["ts"] for e in flushes) < max(e["ts"] for e in forwards), "one time axis"
    assert {"commit L2"} <= {e["name"] for e in json.loads((base / "trace" / "rank0.json").read_text())["traceEvents"]}


def test_end_of_run_summary(run):
    _, stdout = run
    assert "checkpointing summary: training blocked" in stdout and "% of" in stdout
    assert "zero-copy: 0.000 GB copied" in stdout, "zero-copy snapshots copy nothing"
    # What checkpointing cost beyond blocking: the training thread's time in the engine, the
    # flusher processes' CPU, the machine's idle share, and iteration time beside it.
    assert "  training process: " in stdout and "no checkpoint thread" in stdout
    assert "  flusher processes: " in stdout and "s of CPU" in stdout and "MiB unshared resident" in stdout
    assert "  machine: " in stdout and "% idle" in stdout
    assert "  iteration time: " in stdout
    assert "  L1: " in stdout and "  L2: " in stdout and "slowest level:" in stdout


def test_metrics_file_has_the_logged_iterations_and_the_summarys_numbers(run):
    """``--metrics-file``: the logging rank's (the last) object per logged iteration, its stall as
    the engine counted it, and a summary whose numbers print the console's summary again."""
    from checkpointing.engine.run_report import summary_lines
    from tests.launch import read_scalars
    from trainer.metrics_file import read_metrics_file

    base, stdout = run
    records = read_metrics_file(str(base / "metrics.jsonl"))
    assert [r["iteration"] for r in records.iterations] == [5, 10, 12]  # --log-interval 5, and the last
    losses = read_scalars(base / "tb", "lm loss")
    stats = [json.loads((base / "trace" / f"checkpoint-stats-rank{r}.json").read_text()) for r in range(2)]
    for r in records.iterations:
        assert r["lm_loss"] == pytest.approx(losses[r["iteration"]], rel=1e-6)
        assert r["consumed_samples"] == 8 * r["iteration"] and r["iteration_time_ms"] > 0
        stall = 1000 * stats[1]["stall_by_iteration"].get(str(r["iteration"]), 0.0)
        assert r["checkpoint_stall_ms"] == pytest.approx(stall)
    summary = records.summary
    assert (summary["iteration"], summary["iterations_trained"], summary["device"]) == (12, 12, "cpu")
    assert len(summary["peak_rss_mib"]) == 2 and min(summary["peak_rss_mib"]) > 100  # both ranks', gathered
    numbers = dict(summary["checkpoint"])
    ranks = numbers.pop("ranks")
    assert ranks == stats
    for line in summary_lines(ranks, ranks[1], **numbers):
        assert line in stdout


def test_tensorboard_page_shows_the_stall_chart_in_chromium(run, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed: `apt-get install -y chromium` (.ci/run does it) to run the browser test")
    base, _ = run
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(base / "tb"), "--host", "127.0.0.1",
                              "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):  # until the server is up and has read the event files
            try:
                if b"checkpoint/stall-ms" in urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=2).read():
                    break
            except OSError:
                pass
            time.sleep(0.5)
        browser = Chromium(chromium, str(tmp_path / "profile"))
        browser.open(url + "?tagFilter=stall&smoothing=0#timeseries")  # the time-series tab, stall charts only
        assert browser.wait_for_text("checkpoint/stall-ms"), "the page never showed the stall chart"
        assert browser.wait_for_text("checkpoint/stall-per-shard-ms")
        time.sleep(2)  # let the charts draw their lines before the picture
        shot = tmp_path / "shot.png"
        browser.screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("UPDATE_SCREENSHOT") == "1":  # refresh the picture in docs/checkpointing.md
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copy(shot, SCREENSHOT)
    finally:
        if browser is not None:
            browser.close()
        board.terminate()
        board.wait(timeout=30)
