#!/usr/bin/env python
"""Byte-level BPE trained on Shakespeare against the byte tokenizer: tokens per byte, and the
validation loss per byte after the same number of training bytes (the same model shape).

For each tokenizer: prepare the corpus (``prepare_data.py --shakespeare``, BPE trained on it with
``--train-tokenizer``), train the tiny model (4 layers, hidden 64, 4 heads, 64 tokens per
sample, global batch 16, cosine schedule) for as many iterations as make ``--train-bytes`` of
text, then evaluate once on the whole validation split. The loss per byte is the summed loss of
the evaluated label tokens over their UTF-8 bytes (nats per byte; bits per byte = / ln 2).

    python scripts/bench_tokenizers.py [--bpe-sizes 1024 4096] [--train-bytes 2000000] \\
        [--out results/bpe_vs_bytes_cpu.md]
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEQ, GLOBAL_BATCH = 64, 16
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
         "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--hidden-dropout", "0",
         "--attention-dropout", "0", "--micro-batch-size", str(GLOBAL_BATCH), "--global-batch-size", str(GLOBAL_BATCH)]
SCHEDULE = ["--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine"]


def prepare(work: str, name: str, vocab: int | None) -> tuple[str, list[str], str]:
    """(data prefix, tokenizer flags, prepare_data.py's last lines) for one tokenizer."""
    prefix = os.path.join(work, name)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--shakespeare", "--output-prefix", prefix]
    flags = ["--tokenizer-type", "ByteTokenizer"]
    if vocab is not None:
        cmd += ["--tokenizer-type", "GPT2BPETokenizer", "--train-tokenizer", "--vocab-size", str(vocab)]
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{prefix}-vocab.json",
                 "--merge-file", f"{prefix}-merges.txt"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return prefix, flags, out.strip().splitlines()[-2]


def token_bytes(flags: list[str]) -> list[int]:
    """UTF-8 bytes of each token id (the end-of-document token has none)."""
    if flags[1] == "ByteTokenizer":
        return [1] * 256 + [0]
    from tokenization.gpt2_files import EOD_TOKEN, read_bpe_vocab

    # A byte-level token is spelled with one character per byte (GPT-2's byte-to-unicode map).
    vocab = read_bpe_vocab(flags[flags.index("--vocab-file") + 1])
    sizes = [0] * len(vocab)
    for token, i in vocab.items():
        sizes[i] = 0 if token == EOD_TOKEN else len(token)
    return sizes


def validation_set(prefix: str) -> tuple[int, "object"]:
    """(evaluation iterations that cover the validation split once, the split's dataset)."""
    from trainer.data import IndexedGPTDataset

    valid = IndexedGPTDataset(prefix, SEQ, 1234, "valid", (969.0, 30.0, 1.0))
    return valid.num_samples // GLOBAL_BATCH, valid


def train(prefix: str, flags: list[str], iters: int, eval_iters: int, tb: str) -> tuple[float, float, float]:
    """(validation loss per token, final training loss, seconds) of one run."""
    from trainer.metrics_file import read_metrics_file

    metrics = os.path.join(tb, "metrics.jsonl")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "pretrain_gpt.py"), *MODEL, *SCHEDULE, *flags,
           "--data-path", prefix, "--train-iters", str(iters), "--lr-warmup-iters", str(max(iters // 50, 1)),
           "--eval-interval", str(iters), "--eval-iters", str(eval_iters), "--log-interval", str(iters),
           "--tensorboard-dir", tb, "--metrics-file", metrics]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
               GPT_FORCE_CPU="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    seconds = time.perf_counter() - started
    records = read_metrics_file(metrics)
    validation = {r["iteration"]: r["lm_loss"] for r in records.validations}
    training = {r["iteration"]: r["lm_loss"] for r in records.iterations}
    return validation[iters], training[iters], seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bpe-sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--train-bytes", type=int, default=2_000_000, help="text each model trains on")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bpe_vs_bytes_cpu.md"))
    args = p.parse_args()
    import numpy as np

    from models.megatron_import import import_megatron_core

    import_megatron_core()  # megatron-core's import-time torch.compile deferred: ~3 CPU-s less
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from models.config import GPTModelConfig

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, vocab in [("bytes", None)] + [(f"bpe{v}", v) for v in args.bpe_sizes]:
            prefix, flags, prepared = prepare(work, name, vocab)
            print(f"> {name}: {prepared}", flush=True)
            index = IndexedDataset(prefix)
            tokens = int(index.sequence_lengths.sum())
            sizes = token_bytes(flags)
            corpus_bytes = int(np.asarray(sizes)[np.memmap(prefix + ".bin", dtype=index.index.dtype, mode="r")].sum())
            tokens_per_byte = tokens / corpus_bytes
            iters = max(round(args.train_bytes * tokens_per_byte / (GLOBAL_BATCH * SEQ)), 1)
            eval_iters, valid = validation_set(prefix)
            label_bytes = sum(int(sum(sizes[t] for t in valid.sample(i)[1:].tolist()))
                              for i in range(eval_iters * GLOBAL_BATCH))
            label_tokens = eval_iters * GLOBAL_BATCH * SEQ
            loss, train_loss, seconds = train(prefix, flags, iters, eval_iters, os.path.join(work, f"tb-{name}"))
            per_byte = loss * label_tokens / label_bytes
            vocab_size = len(sizes)
            shape = GPTModelConfig(4, 64, 4, 256, SEQ, SEQ, vocab_size)
            params = shape.num_parameters() - (shape.padded_vocab_size(1) - vocab_size) * shape.hidden_size
            rows.append((name, vocab_size, tokens_per_byte, iters, iters * GLOBAL_BATCH * SEQ / tokens_per_byte,
                         SEQ / tokens_per_byte, params, train_loss, loss, per_byte, seconds))
            print(f"> {name}: vocabulary {vocab_size}, {tokens_per_byte:.3f} tokens/byte, {iters} iterations, "
                  f"validation {loss:.4f} nats/token = {per_byte:.4f} nats/byte ({per_byte / math.log(2):.4f} bits/byte), "
                  f"{seconds:.0f} s", flush=True)
    lines = [
        "# Byte-level BPE trained on Shakespeare vs the byte tokenizer (CPU)",
        "",
        f"`python scripts/bench_tokenizers.py --bpe-sizes {' '.join(map(str, args.bpe_sizes))} --train-bytes "
        f"{args.train_bytes}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 process on this machine.",
        "",
        f"Model: 4 layers, hidden 64, 4 heads, FFN 256, {SEQ} tokens per sample, global batch {GLOBAL_BATCH}, "
        "lr 3e-3 -> 3e-4 cosine, warmup 2% of the iterations, no dropout; each run trains on the same number of "
        "bytes of text (iterations = bytes x tokens per byte / tokens per iteration), then evaluates once on the "
        "whole validation split (`--split 969,30,1`). Loss per byte = validation loss per token x label tokens / "
        "their UTF-8 bytes (the end-of-document token counts 0 bytes). Parameters: the true vocabulary's "
        "(the padded rows are masked out). Tokens per byte over the whole corpus, one end-of-document token per play.",
        "",
        "| tokenizer | vocabulary | tokens per byte | iterations | training bytes | bytes of context | parameters "
        "| final training loss (nats/token) | validation loss (nats/token) | validation loss per byte (nats) | bits per byte | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, vocab, tpb, iters, nbytes, context, params, train_loss, loss, per_byte, seconds in rows:
        lines.append(f"| {name} | {vocab} | {tpb:.3f} | {iters} | {nbytes / 1e6:.2f} M | {context:.0f} | "
                     f"{params / 1e6:.3f} M | {train_loss:.4f} | {loss:.4f} | {per_byte:.4f} | "
                     f"{per_byte / math.log(2):.4f} | {seconds:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
