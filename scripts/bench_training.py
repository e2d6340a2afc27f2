#!/usr/bin/env python
"""Training speed on this machine, measured as ratios within one run.

1. tiny model (4 layers, hidden 64): ms/iteration on 1 process and on 8 processes
   (TP2 x PP2 x DP2, distributed optimizer), each a torchrun launch, median of iterations 3..N.
2. ~125M model (GPT-3 small shape, shorter sequence) on 1 process: our full training iteration
   (1F1B schedule, flat buffers, ZeRO-1 Adam) next to a plain megatron-core GPTModel
   forward/backward (+ torch AdamW) of the same model and batch, in interleaved rounds.

    python scripts/bench_training.py [--skip-tiny] [--seq-length 256] [--rounds 3]

``--part memory`` instead: peak resident memory per rank and s/iteration of the 125M shape,
GPT-2 and Llama style, at sequence 2048 (``benchmarks/training_memory.py``): on 1 process
with and without full recomputation, and at TP2 with and without ``--sequence-parallel``.

    python scripts/bench_training.py --part memory [--memory-seq-length 2048] [--memory-iters 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 --seq-length 64 "
        "--max-position-embeddings 64 --vocab-size 1024 --mock-data --micro-batch-size 2 --global-batch-size 16 "
        "--lr 1e-3 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0").split()


def tiny_run(nproc: int, extra: list[str], iters: int) -> float:
    from trainer.metrics_file import read_metrics_file

    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(ROOT, "scripts", "pretrain_gpt.py"), *TINY, *extra, "--train-iters", str(iters),
               "--log-interval", "1", "--metrics-file", metrics]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        times = {r["iteration"]: r["iteration_time_ms"] for r in read_metrics_file(metrics).iterations}
    return statistics.median(v for k, v in times.items() if k > 2)


def bench_125m(seq_length: int, rounds: int, iters: int) -> dict:
    import torch

    from models.gpt import build_gpt_model
    from trainer.arguments import parse_job_config
    from trainer.device import select_device
    from trainer.pipeline_schedule import causal_attention_mask
    from trainer.training import Trainer, init_distributed

    torch.set_num_threads(os.cpu_count() or 1)
    job = parse_job_config(["--model-size", "125M", "--seq-length", str(seq_length), "--max-position-embeddings",
                            str(seq_length), "--vocab-size", "50257", "--mock-data", "--micro-batch-size", "1",
                            "--global-batch-size", "2", "--train-iters", "1000", "--lr", "1e-4",
                            "--hidden-dropout", "0", "--attention-dropout", "0"], world_size=1)
    device = select_device()
    from models.cpu_compat import apply_cpu_compat

    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = job.parallel.initialize()
    ours = Trainer(job, device, groups)
    plain = build_gpt_model(job.model, tensor_parallel=1, pipeline_parallel=1, pre_process=True, post_process=True,
                            device=device.device, attention_backend=job.training.attention_backend,
                            seed=job.training.seed)
    adam = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.01)
    mask = causal_attention_mask(seq_length, device.device)

    def plain_step(with_optimizer: bool, iteration: int):
        plain.train()
        batches = list(ours.train_data.microbatches(iteration))
        for b in batches:
            loss = plain(b.tokens, b.position_ids, mask, labels=b.labels).float().mean() / len(batches)
            loss.backward()
        if with_optimizer:
            adam.step()
        adam.zero_grad(set_to_none=True)

    results = {"ours": [], "plain fwd/bwd": [], "plain fwd/bwd + AdamW": []}
    it = 0
    for _ in range(rounds):
        for name in results:
            for _ in range(iters):
                started = time.perf_counter()
                if name == "ours":
                    ours.train_step()
                else:
                    plain_step(name.endswith("AdamW"), it)
                results[name].append(time.perf_counter() - started)
                it += 1
    params = job.model.num_parameters()
    return {"params": params, **{k: 1000 * statistics.median(v[1:]) for k, v in results.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-125m", action="store_true")
    p.add_argument("--tiny-iters", type=int, default=30)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=3, help="iterations per method per round (125M)")
    p.add_argument("--part", choices=("speed", "memory"), default="speed",
                   help="speed: the ratios above; memory: peak resident memory and s/iteration at a long sequence")
    p.add_argument("--memory-seq-length", type=int, default=2048)
    p.add_argument("--memory-iters", type=int, default=3, help="iterations per run (the first is not timed)")
    p.add_argument("--memory-models", default="gpt-125M,llama-125M",
                   help="models of the 1-process rows (none: no such rows)")
    p.add_argument("--memory-recompute", default="none,full", help="recomputation of the 1-process rows: "
                   "none, full, selective")
    p.add_argument("--memory-tp2-models", default="llama-125M", help="models of the TP2 rows (none: no such rows)")
    p.add_argument("--memory-tp2-recompute", default="none,full", help="recomputation of the TP2 rows")
    p.add_argument("--memory-timeout", type=float, default=900, help="seconds a run may take")
    p.add_argument("--memory-logs", default=os.path.join(tempfile.gettempdir(), "bench_training_memory"),
                   help="folder of the runs' logs")
    args = p.parse_args()
    if args.part == "memory":
        from benchmarks.training_memory import run

        def models(text: str) -> list[str]:
            return [] if text == "none" else text.split(",")

        lines = run(models(args.memory_models), args.memory_recompute.split(","), models(args.memory_tp2_models),
                    args.memory_tp2_recompute.split(","), args.memory_seq_length, args.memory_iters,
                    args.memory_timeout, args.memory_logs)
        print("\n" + "\n".join(lines))
        return 0
    if not args.skip_tiny:
        one = tiny_run(1, [], args.tiny_iters)
        eight = tiny_run(8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                             "--use-distributed-optimizer"], args.tiny_iters)
        print("| tiny model (global batch 16 x 64 tokens) | ms/iteration |")
        print("|---|---|")
        print(f"| 1 process | {one:.1f} |")
        print(f"| 8 processes, TP2 x PP2 x DP2, distributed optimizer | {eight:.1f} |")
        print(f"| ratio 8 / 1 | {eight / one:.2f} |", flush=True)
    if not args.skip_125m:
        r = bench_125m(args.seq_length, args.rounds, args.iters)
        print(f"\n| {r['params'] / 1e6:.0f}M model, 1 process, 2 x {args.seq_length} tokens | ms/iteration | ratio to ours |")
        print("|---|---|---|")
        for name in ("ours", "plain fwd/bwd", "plain fwd/bwd + AdamW"):
            print(f"| {name} | {r[name]:.0f} | {r[name] / r['ours']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
