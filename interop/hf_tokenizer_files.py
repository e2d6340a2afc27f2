"""The tokenizer files of an exported model: which ones a run used, and the ``transformers``
files around them (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``).

- ``GPT2BPETokenizer``: the run's ``--vocab-file``/``--merge-file`` (recorded in the checkpoint;
  the converter's own flags override them when the files have moved).
- ``ByteTokenizer``: a byte-level BPE without merges whose ids are the bytes and ``<|endoftext|>``
  256 (``tokenization.gpt2_files.write_byte_vocabulary``): ``transformers``' GPT-2 tokenizer then encodes
  exactly as ``ByteTokenizer`` does.
- ``NullTokenizer``: the data were token ids; there is no tokenizer to export.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from interop.gpt2_mapping import GPT2ConversionError
from tokenization.gpt2_files import EOD_TOKEN, write_byte_vocabulary
from tokenization.tokenizer import build_tokenizer

VOCAB_NAME = "vocab.json"
MERGES_NAME = "merges.txt"


@dataclass(frozen=True)
class TokenizerExport:
    """What the export says about the run's tokenizer."""

    tokenizer_type: str
    eod: int | None
    """The end-of-document id: GPT-2's ``bos_token_id``/``eos_token_id``."""
    files: tuple[str, ...]
    """Names of the files written into the model directory (none for ``NullTokenizer``)."""


def export_tokenizer(run_args: dict, vocab_size: int, out_dir: str, max_length: int,
                     vocab_file: str | None = None, merge_file: str | None = None) -> TokenizerExport:
    """Write the run's tokenizer into ``out_dir`` in ``transformers``' layout; raises
    :class:`GPT2ConversionError` when its files are gone or are not the checkpoint's vocabulary."""
    kind = run_args.get("tokenizer_type", "NullTokenizer")
    if kind == "NullTokenizer":
        return TokenizerExport(kind, vocab_size - 1, ())
    vocab_out, merges_out = os.path.join(out_dir, VOCAB_NAME), os.path.join(out_dir, MERGES_NAME)
    if kind == "ByteTokenizer":
        write_byte_vocabulary(vocab_out, merges_out)
    elif kind == "GPT2BPETokenizer":
        vocab_file = vocab_file or run_args.get("vocab_file")
        merge_file = merge_file or run_args.get("merge_file")
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise GPT2ConversionError(
                    f"the run's tokenizer file {path or '(not recorded)'} is not there: pass the run's {flag} to "
                    "convert_checkpoint.py")
        shutil.copyfile(vocab_file, vocab_out)
        shutil.copyfile(merge_file, merges_out)
    else:
        raise GPT2ConversionError(f"the run's tokenizer {kind!r} has no GPT-2 form")
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_out, merge_file=merges_out)
    if tokenizer.vocab_size != vocab_size:
        raise GPT2ConversionError(f"the tokenizer has {tokenizer.vocab_size} entries, the checkpoint's model "
                                  f"{vocab_size}: these are not the run's tokenizer files")
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
                   "add_bos_token": False, "errors": "replace", **special}, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return TokenizerExport(kind, tokenizer.eod, (VOCAB_NAME, MERGES_NAME, "tokenizer_config.json",
                                                 "special_tokens_map.json"))
