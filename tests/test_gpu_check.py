"""The GPU check's scripts, on the CPU: ``scripts/gpu_check.sh --dry-run`` (every file it needs,
every trainer command through the trainer's own parser) and the report arithmetic of the GPU
bench (``benchmarks.gpu_*``) on canned runs: console lines and metrics files written by the
trainer's own writers. A lent GPU's time is scarce: a typo or a reading bug must fail here, not
there."""

import io
import os
import subprocess
import sys

import pytest

from benchmarks.engine_summary import engine_summary
from benchmarks.gpu_plan import BenchError, all_runs, check_commands, make_plan
from benchmarks.gpu_report import Results, render
from benchmarks.gpu_runs import RunResult, run_one
from benchmarks.gpu_sections import RNG_NOT_RESTORED, equivalence_section, resume_section
from benchmarks.gpu_shapes import Shape, activation_bytes_per_token, estimated_memory_gb, throughput
from benchmarks.processes import Budget
from benchmarks.trainer_output import median_ms, parse_run
from models.config import model_flops_per_iteration
from trainer.metrics_file import MetricsFile
from trainer.metrics_log import MetricsLogger

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_passes():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench_trainer_gpu.py --dry-run rc 0" in done.stdout
    assert "8 trainer commands parse" in done.stdout
    # (e), last: the llama3-1B pair at sequence 4096, optional (the budget may be spent by then).
    assert "ok e-llama-plain: 1235.8M parameters, global batch 8 x 4096 tokens, ~80.3 GB GPU memory" in done.stdout
    assert "ok e-llama-engine: 1235.8M parameters" in done.stdout and "host pool ~35 GB" in done.stdout
    assert "--model-size llama3-1B --vocab-size 128256 --seq-length 4096 --max-position-embeddings 4096" in done.stdout
    assert "then, while the budget lasts, the optional e-llama-plain, e-llama-engine" in done.stdout


def test_bench_dry_run_refuses_a_typo(monkeypatch):
    plan = make_plan("/tmp/bench-trainer-gpu-test", smoke=False, with_large=False)
    plan.medium[0].args.append("--micro-batch-sise")
    with pytest.raises(BenchError, match="b-plain: unrecognized arguments: --micro-batch-sise"):
        check_commands(plan)


def test_every_run_of_the_plan_writes_a_metrics_file_of_its_own():
    plan = make_plan("/tmp/bench-trainer-gpu-test", smoke=False, with_large=True)
    runs = [*plan.equivalence, plan.resume, *plan.medium, plan.large, *plan.llama]
    assert all_runs(plan) == runs  # the llama pair last
    paths = [spec.args[spec.args.index("--metrics-file") + 1] for spec in runs]
    assert paths == [spec.metrics_path for spec in runs] and len(set(paths)) == len(runs)


def test_the_smoke_plan_has_a_tiny_llama_stand_in():
    plan = make_plan("/tmp/bench-trainer-gpu-test", smoke=True, with_large=False)
    plain, engine = plan.llama
    assert plain.shape.config.swiglu and plain.shape.config.query_groups == 2 and plain.shape.parameters < 1e6
    assert plain.optional and engine.optional and engine.pool_bytes < 1e8
    assert [line.split(":")[0] for line in check_commands(plan)][-2:] == ["ok e-llama-plain", "ok e-llama-engine"]
    assert make_plan("/tmp/bench-trainer-gpu-test", smoke=True, with_large=False, with_llama=False).llama is None


def test_memory_estimate_by_hand():
    """GPT: Korthikanti et al.'s 34sbh + 5as^2b per layer; llama3-1B: SwiGLU's wider MLP,
    grouped keys and values (widened to every head by sdpa), no dropout masks."""
    medium = Shape.explicit("350M", 24, 1024, 16, 2048, 50257).config
    s, h, a = 2048, 1024, 16
    assert activation_bytes_per_token(medium, True) == 34 * h + 5 * a * s
    llama = Shape.preset("llama3-1B", 128256, 4096).config
    s, h, a, kv, f = 4096, 2048, 32, 512, 8192
    per_token = 4 * h + (2 * h + 6 * h + 4 * kv + 2 * h) + (2 * h + 4 * f + 2 * f + 2 * f) + 2 * a * s
    assert activation_bytes_per_token(llama, True) == per_token
    assert activation_bytes_per_token(llama, True, "selective") == per_token - 2 * a * s
    assert activation_bytes_per_token(llama, True, "full") == 2 * h
    states, logits = 1_235_814_400 * 18, 2 * s * 128256 * 10
    assert estimated_memory_gb(llama, 2, True) == pytest.approx((states + 16 * 2 * s * per_token + logits) / 1e9)
    assert estimated_memory_gb(llama, 2, True, "full") == pytest.approx(
        (states + 16 * 2 * s * 2 * h + 2 * s * per_token + logits) / 1e9)


def _canned_run(directory, losses, ms, summary=(), device="cuda:0", first=1, notes=(), peak_device_mib=None):
    """A run as the trainer leaves it, written by its own writers (``MetricsLogger`` for the
    console, ``MetricsFile`` for the metrics file), so a change of either format fails here:
    (console text, metrics file path)."""
    out = io.StringIO()
    logger = MetricsLogger(True, len(losses), None, stream=out)
    path = os.path.join(directory, f"metrics-{len(os.listdir(directory))}.jsonl")
    metrics = MetricsFile(path, True)
    logger.info("> training GPT: 355.87M parameters, TP1 x PP1 x DP1 (1 processes), 4 micro-batches of 4 per rank, "
                f"global batch 16, bf16, attention sdpa, distributed optimizer (6 shards on this rank), device {device}")
    for line in notes:
        logger.info(line)
    for it, (loss, t) in enumerate(zip(losses, ms), start=first):
        logger.console_line(it, loss, 1e-4, 1.5, t / 1000, 32768, it * 16)
        metrics.iteration(it, loss, 1e-4, 1.5, t / 1000, 32768, it * 16)
    for line in summary:
        logger.info(line)
    logger.info("> training done: %d iterations" % len(losses))
    metrics.summary(first + len(losses) - 1, len(losses), sum(ms) / 1000, device, False,
                    peak_device_mib=peak_device_mib)
    metrics.close()
    return out.getvalue(), path


SUMMARY = ["> checkpointing summary: stall 12.5 ms in all on the worst rank (0), 0.10% of 12.0 s of training; "
           "40 fence waits; 30 snapshots (L0)",
           "  L1: 2 checkpoints, 9.960 GB written, slowest flush 8.10 s, ~0.62 GB/s, 1 superseded, 0 failed (rank-flushes)",
           "  slowest level: L1 (~0.62 GB/s)"]


def test_a_run_is_read_from_its_metrics_file_and_its_console(tmp_path):
    losses = [10.9, 10.5, 9.75, float("nan")]
    parsed = parse_run(*_canned_run(str(tmp_path), losses, [900.0, 410.0, 400.5, 401.0], SUMMARY))
    assert parsed.iteration_ms == pytest.approx({1: 900.0, 2: 410.0, 3: 400.5, 4: 401.0})
    assert parsed.loss[1] == 10.9 and parsed.loss[3] == 9.75  # exact: no console rounding
    assert parsed.loss[4] != parsed.loss[4]  # NaN survives the round trip
    assert parsed.device == "cuda:0"
    assert parsed.describe.startswith("> training GPT: 355.87M parameters")
    assert parsed.summary[:3] == SUMMARY and parsed.summary[-1] == "> training done: 4 iterations"
    assert median_ms(parsed, 2) == pytest.approx(401.0)


def test_a_run_killed_mid_line_keeps_what_it_logged(tmp_path):
    console, path = _canned_run(str(tmp_path), [10.9, 10.5], [900.0, 410.0])
    lines = open(path).read().splitlines()
    with open(path, "w") as f:  # no summary, and the last iteration's object cut short
        f.write(lines[0] + "\n" + lines[1][:20])
    parsed = parse_run(console, path)
    assert parsed.loss == {1: 10.9} and parsed.device is None


def test_model_flops_and_mfu_by_hand():
    medium = Shape.explicit("350M", 24, 1024, 16, 2048, 50257)
    h, layers, seq, vocab = 1024, 24, 2048, 50304  # 50257 padded to a multiple of 128
    per_layer = 12 * h * h + 13 * h  # QKV, projection, MLP weights and biases, two layer norms
    assert medium.parameters == layers * per_layer + 2 * h + vocab * h + seq * h
    tokens = 16 * seq
    dense = 6 * tokens * (layers * per_layer + 2 * h + vocab * h)  # non-embedding + output layer
    attention = 12 * layers * h * seq * tokens
    assert model_flops_per_iteration(medium.config, tokens) == pytest.approx(dense + attention, rel=1e-12)
    t = throughput(medium.config, 16, 400.0, 800.0)
    assert t.tokens_per_s == pytest.approx(tokens / 0.4)
    assert t.model_tflops == pytest.approx((dense + attention) / 0.4 / 1e12)
    assert t.mfu == pytest.approx(t.model_tflops / 800.0)
    assert throughput(medium.config, 16, 400.0, None).mfu is None


def test_engine_summary_with_and_without_the_newer_counters():
    stats = {"stall_seconds": 0.0125, "fence_waits": 40, "snapshots": 30,
             "stall_by_iteration": {"10": 0.01, "11": 0.0025}, "skipped": {"L1": 1},
             "flushes": [{"level": "L1", "version": 10, "bytes": 5e9, "seconds": 8.0, "error": None},
                         {"level": "L1", "version": 30, "bytes": 5e9, "seconds": 7.0, "error": None},
                         {"level": "L2", "version": 30, "bytes": 0, "seconds": 0.1, "error": "EIO"}]}
    old = engine_summary(stats, estimated_state_bytes=int(4.9e9))
    assert old.state_gb_estimated and old.state_gb == pytest.approx(4.9)
    assert old.blocked_ms_per_gb_per_request is None and old.copy_gbps is None
    assert old.flushes["L1"] == {"ok": 2, "failed": 0, "bytes": 1e10, "seconds": [8.0, 7.0]}
    assert old.flushes["L2"]["failed"] == 1
    assert old.stall_by_iteration_ms == {10: pytest.approx(10.0), 11: pytest.approx(2.5)}
    new = engine_summary(dict(stats, requests=30, request_seconds=0.06, copy_seconds=3.0, state_bytes=int(5e9)),
                               estimated_state_bytes=1)
    assert not new.state_gb_estimated
    assert new.blocked_ms_per_gb_per_request == pytest.approx(60 / 30 / 5)  # 2 ms per request, 5 GB
    assert new.copy_gbps == pytest.approx(5 * 30 / 3.0)


@pytest.fixture
def result(tmp_path):
    def make(spec, losses, device, first=1, notes=(), ms=10.0, peak_device_mib=None):
        return RunResult(spec, rc=0, parsed=parse_run(*_canned_run(str(tmp_path), losses, [ms] * len(losses),
                                                                   device=device, first=first, notes=notes,
                                                                   peak_device_mib=peak_device_mib)))
    return make


def test_equivalence_needs_the_gpu_leg_on_the_gpu(result):
    plan = make_plan("/tmp/x", smoke=False, with_large=False)
    cpu_spec, gpu_spec = plan.equivalence
    cpu = result(cpu_spec, [6.94, 6.93], "cpu")
    lines, passed = equivalence_section(cpu, result(gpu_spec, [6.94, 6.93005], "cuda:0"), smoke=False)
    assert passed and "**PASS**" in "\n".join(lines)
    _, passed = equivalence_section(cpu, result(gpu_spec, [6.94, 6.9302], "cuda:0"), smoke=False)
    assert not passed  # 2e-4 apart
    lines, passed = equivalence_section(cpu, result(gpu_spec, [6.94, 6.93], "cpu"), smoke=False)
    assert not passed and "expected `cuda`" in "\n".join(lines)


def test_report_renders_a_failed_run_with_its_log_tail(result):
    plan = make_plan("/tmp/x", smoke=False, with_large=True)
    res = Results(plan, ["host: test"], started="now")
    res.equivalence = (result(plan.equivalence[0], [6.9], "cpu"), result(plan.equivalence[1], [6.9], "cuda:0"))
    res.hardware = {"matmul_tflops": 700.0, "matmul_tflops_trials": [690.0, 700.0, 695.0],
                    "d2h_gbps": {"pinned": 50.0}}
    plain = result(plan.medium[0], [11.0] * 30, "cuda:0")
    failed = RunResult(plan.medium[1], rc=1, tail="Traceback ...\nRuntimeError: cudaHostRegister failed")
    res.medium = [plain, failed]
    res.large = RunResult(plan.large, timed_out=True, rc=-9, wall_s=150)
    text = render(res)
    assert "| (i) no checkpointing | 356M | 10.0 ms |" in text
    assert "b-engine did not complete: exit code 1" in text and "RuntimeError: cudaHostRegister failed" in text
    assert "d-large did not complete: timed out after 150 s" in text
    assert "| pinned | 50.0 |" in text


def test_resume_across_devices_needs_the_same_losses_and_the_rng_note(result):
    plan = make_plan("/tmp/x", smoke=False, with_large=False)
    cpu = result(plan.equivalence[0], [6.94, 6.93, 6.91, 6.90], "cpu")

    def resumed(losses, note):
        notes = ["> checkpoint: written on cpu, this run is on cuda: the cpu " + RNG_NOT_RESTORED] if note else []
        return result(plan.resume, losses, "cuda:0", first=3, notes=notes)

    assert resume_section(cpu, resumed([6.91, 6.90], True), 2, smoke=False)[1]
    assert not resume_section(cpu, resumed([6.91, 6.90], False), 2, smoke=False)[1]  # silent about RNG
    assert not resume_section(cpu, resumed([6.91, 6.95], True), 2, smoke=False)[1]  # another loss
    # tests/test_device.py pins the same phrase in the trainer's own note.


def test_report_renders_the_llama_pair(result):
    """(e): tokens/s, MFU, peak GPU memory of both llama3-1B runs and the engine's ratio."""
    plan = make_plan("/tmp/x", smoke=False, with_large=False)
    res = Results(plan, ["host: test"], started="now")
    res.hardware = {"matmul_tflops": 800.0, "matmul_tflops_trials": [800.0], "d2h_gbps": {}}
    plain = result(plan.llama[0], [11.0] * 10, "cuda:0", ms=800.0, peak_device_mib=[47104.0])
    engine = result(plan.llama[1], [11.0] * 10, "cuda:0", ms=840.0, peak_device_mib=[48128.0])
    res.llama = [plain, engine]
    text = render(res)
    assert "## e. llama3-1B preset at sequence 4096: throughput, peak GPU memory and the engine's cost" in text
    flops = model_flops_per_iteration(plan.llama[0].shape.config, 8 * 4096)
    tflops = flops / 0.8 / 1e12
    assert (f"| (i) no checkpointing | 1.24B | 800.0 ms | {8 * 4096 / 0.8:,.0f} | {tflops:.1f} | "
            f"{100 * tflops / 800:.1f}% | - | 46.0 GiB |") in text
    assert "| (ii) L0 every iteration + L1 every 5 iterations | 1.24B | 840.0 ms |" in text
    assert "| +5.0% | 47.0 GiB |" in text
    assert "Median iteration time (ii) / (i): **1.050** (840.0 / 800.0 ms)." in text
    assert "~80 GB (`estimated_memory_gb`" in text


def test_the_llama_pair_not_run_for_want_of_budget(result, tmp_path):
    """The pair is last: with the budget spent it is reported as not run and fails nothing."""
    plan = make_plan(str(tmp_path), smoke=False, with_large=False)
    spent = Budget(0)
    skipped = [run_one(spec, str(tmp_path), spent) for spec in plan.llama]
    assert all(r.skipped and r.skipped.startswith("budget (") for r in skipped)
    res = Results(plan, ["host: test"], started="now")
    res.llama = skipped
    text = render(res)
    assert "| (i) no checkpointing | not run: budget (" in text
    assert "| (ii) L0 every iteration + L1 every 5 iterations | not run: budget (" in text
    assert "did not complete" not in text and "### (ii) the engine" not in text
