"""Peak resident memory per rank and s/iteration of the 125M shape at a long sequence on the CPU
(``scripts/bench_training.py --part memory``).

Each row is one ``pretrain_gpt.py`` run, a job of its own (torchrun with the row's processes),
fp32, mock data, micro-batch 1 and global batch 1, dropout 0 (so SDPA keeps torch's fused flash
kernel, which takes no dropout on the CPU). Each rank records its own peak resident memory
(``VmHWM``, :func:`trainer.metrics_file.peak_resident_mib`) and the logging rank writes every
rank's into the metrics file's summary; s/iteration is the median of the iterations after the
first. Each run's ranks split the machine's cores between them (OpenMP threads = cores / ranks),
so every row has the whole machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

from benchmarks.processes import PRETRAIN, LoggedProcess, job_env
from trainer.arguments import parse_job_config
from trainer.metrics_file import read_metrics_file

SHAPE = ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12"]
"""The GPT-3 small shape (the 125M preset's): 12 layers x 768, 12 heads."""

MODELS: dict[str, list[str]] = {
    # GPT-2 style: learned positions, LayerNorm, GELU MLP of 4 x hidden, biases, tied embeddings.
    "gpt-125M": SHAPE,
    # The same shape Llama-style: RoPE, RMSNorm, SwiGLU (Megatron's default width for it: 2/3 of
    # 4 x hidden in multiples of 64, 2048), 4 key/value groups, no biases, untied output layer.
    "llama-125M": [*SHAPE, "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                   "--group-query-attention", "--num-query-groups", "4", "--disable-bias-linear",
                   "--untie-embeddings-and-output-weights"],
}

RECOMPUTE: dict[str, list[str]] = {
    "none": [],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective"],
}


def common_args(seq_length: int, iters: int) -> list[str]:
    return ["--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length), "--vocab-size", "50257",
            "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(iters),
            "--lr", "1e-4", "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1"]


def row_args(model: str, recompute: str, tp: int, sequence_parallel: bool, seq_length: int, iters: int) -> list[str]:
    """The trainer's flags for one row."""
    args = [*MODELS[model], *common_args(seq_length, iters), *RECOMPUTE[recompute]]
    if tp > 1:
        args += ["--tensor-model-parallel-size", str(tp)]
    if sequence_parallel:
        args.append("--sequence-parallel")
    return args


def parameters(model: str) -> int:
    """Parameters of the whole model (vocabulary padded as at TP1)."""
    return parse_job_config([*MODELS[model], *common_args(2048, 1)], world_size=1).model.num_parameters()


def measure(args: list[str], nproc: int, timeout_s: float, log_dir: str) -> dict:
    """One run: every rank's peak resident MiB and the median s/iteration after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", PRETRAIN,
               *args, "--metrics-file", metrics]
        threads = max(1, (os.cpu_count() or 1) // nproc)
        env = job_env({"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "GPT_FORCE_CPU": "1"})
        log = os.path.join(log_dir, f"run{len(os.listdir(log_dir))}.log")
        rc, timed_out, wall, text = LoggedProcess(cmd, env, log, timeout_s).finish()
        records = read_metrics_file(metrics)
    if rc != 0 or timed_out or records.summary is None:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit code {rc}"
        raise RuntimeError(f"pretrain_gpt.py {' '.join(args)}: {why}:\n{text[-3000:]}")
    times = [r["iteration_time_ms"] / 1000 for r in records.iterations if r["iteration"] > 1]
    return {"peak_rss_mib": records.summary["peak_rss_mib"], "s_per_iteration": statistics.median(times),
            "iteration_s": [r["iteration_time_ms"] / 1000 for r in records.iterations], "wall_s": wall,
            "threads": threads}


def rows(models: list[str], recomputes: list[str], tp2_models: list[str], tp2_recomputes: list[str]):
    """(model, recompute, TP, sequence parallel) of each row, in table order."""
    out = [(m, r, 1, False) for m in models for r in recomputes]
    out += [(m, r, 2, sp) for m in tp2_models for r in tp2_recomputes for sp in (False, True)]
    return out


def run(models: list[str], recomputes: list[str], tp2_models: list[str], tp2_recomputes: list[str],
        seq_length: int, iters: int, timeout_s: float, log_dir: str) -> list[str]:
    """Run every row, printing each as it is measured; returns the markdown table's lines."""
    os.makedirs(log_dir, exist_ok=True)
    sizes = {m: parameters(m) for m in {*models, *tp2_models}}
    lines = [f"| model, 1 x {seq_length} tokens | recompute | layout | peak RSS per rank (MiB) | s/iteration |",
             "|---|---|---|---|---|"]
    for model, recompute, tp, sp in rows(models, recomputes, tp2_models, tp2_recomputes):
        layout = "1 process" if tp == 1 else f"TP{tp}, {'sequence parallel' if sp else 'no SP'}"
        r = measure(row_args(model, recompute, tp, sp, seq_length, iters), tp, timeout_s, log_dir)
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_rss_mib"])
        line = (f"| {model} ({sizes[model] / 1e6:.0f}M) | {recompute} | {layout} | {peaks} | "
                f"{r['s_per_iteration']:.2f} |")
        lines.append(line)
        print(f"{line}   iterations (s): {', '.join(f'{t:.2f}' for t in r['iteration_s'])}; "
              f"{r['threads']} threads/rank; run {r['wall_s']:.0f} s", flush=True)
    return lines
