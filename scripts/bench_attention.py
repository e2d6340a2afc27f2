#!/usr/bin/env python
"""ms/iteration of the training step with ``--attention-backend local`` and ``sdpa``, interleaved.

One process, fp32, micro-batch 1, global batch 1, the ``--model-size`` preset at ``--seq-length``.
The trainer is built once with megatron's ``DotProductAttention`` and each layer also gets an
``SDPAttention`` twin; every iteration swaps one backend in (order alternating ABBA), so both see
the same weights, data path, optimizer and machine drift. The two layer specs differ only in this
module (``tests/test_attention.py`` checks it), and neither has parameters. Prints a markdown
table: median ms/iteration after ``--warmup`` iterations of each.

    python scripts/bench_attention.py --seq-length 512 --attention-dropout 0.1 0
"""

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BACKENDS = ("local", "sdpa")


def build(device, groups, model_size: str, seq_length: int, attention_dropout: float):
    """A 1-process Trainer with local attention, and each layer's (local, sdpa) core attention."""
    from models.sdpa_attention import SDPAttention
    from trainer.arguments import parse_job_config
    from trainer.training import Trainer

    job = parse_job_config(["--model-size", model_size, "--seq-length", str(seq_length), "--max-position-embeddings",
                            str(seq_length), "--vocab-size", "50257", "--mock-data", "--micro-batch-size", "1",
                            "--global-batch-size", "1", "--train-iters", "1000", "--lr", "1e-4",
                            "--attention-dropout", str(attention_dropout), "--attention-backend", "local"],
                           world_size=1)
    trainer = Trainer(job, device, groups)
    pairs = []
    for layer in trainer.model.decoder.layers:
        local = layer.self_attention.core_attention
        sdpa = SDPAttention(config=local.config, layer_number=local.layer_number, attn_mask_type=local.attn_mask_type,
                            attention_type=local.attention_type, pg_collection=local.pg_collection)
        pairs.append((layer.self_attention, {"local": local, "sdpa": sdpa}))
    return job, trainer, pairs


def run_case(device, groups, model_size: str, seq_length: int, attention_dropout: float, iters: int,
             warmup: int) -> dict:
    import gc

    job, trainer, pairs = build(device, groups, model_size, seq_length, attention_dropout)
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i in range(iters):
        for backend in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
            for attention, modules in pairs:
                attention.core_attention = modules[backend]
            device.synchronize()
            started = time.perf_counter()
            trainer.train_step()
            device.synchronize()
            times[backend].append(time.perf_counter() - started)
            print(f"  seq {seq_length} dropout {attention_dropout} iteration {i + 1} {backend}: "
                  f"{1000 * times[backend][-1]:.0f} ms", file=sys.stderr, flush=True)
    params = job.model.num_parameters()
    del trainer, pairs
    gc.collect()
    return {"params": params, **{b: [1000 * t for t in times[b]] for b in BACKENDS},
            **{f"median {b}": 1000 * statistics.median(times[b][warmup:]) for b in BACKENDS}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="125M")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--attention-dropout", type=float, nargs="+", default=[0.1, 0.0],
                   help="one case per value (the presets' default is 0.1)")
    p.add_argument("--iters", type=int, default=6, help="iterations per backend and case")
    p.add_argument("--warmup", type=int, default=2, help="first iterations of each backend left out of the median")
    args = p.parse_args()
    if not 0 <= args.warmup < args.iters:
        p.error(f"--warmup must be in [0, --iters), got {args.warmup} with --iters {args.iters}")

    import torch

    from models.cpu_compat import apply_cpu_compat
    from trainer.device import select_device
    from trainer.parallel_dims import ParallelDims
    from trainer.training import init_distributed

    torch.set_num_threads(os.cpu_count() or 1)
    device = select_device()
    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = ParallelDims(world_size=1, tensor_parallel=1, pipeline_parallel=1).initialize()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = [(d, run_case(device, groups, args.model_size, args.seq_length, d, args.iters, args.warmup))
            for d in args.attention_dropout]

    command = "python scripts/bench_attention.py " + shlex.join(sys.argv[1:])
    print(f"`{command}`, {started:%Y-%m-%d %H:%M} UTC, device {device.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print(f"| {rows[0][1]['params'] / 1e6:.0f}M model, 1 process, fp32, 1 x {args.seq_length} tokens | "
          f"local (DotProductAttention) ms/it | sdpa ms/it | sdpa / local |")
    print("|---|---|---|---|")
    for dropout, r in rows:
        local, sdpa = r["median local"], r["median sdpa"]
        print(f"| attention dropout {dropout:g} | {local:.0f} | {sdpa:.0f} | {sdpa / local:.2f} |")
    print(f"\nMedian of iterations {args.warmup + 1}..{args.iters} of each backend; every iteration (ms):\n")
    for dropout, r in rows:
        for b in BACKENDS:
            print(f"- dropout {dropout:g}, {b}: " + ", ".join(f"{t:.0f}" for t in r[b]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
