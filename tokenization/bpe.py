"""Byte-level BPE through the ``tokenizers`` library: train one on a corpus and load GPT-2 style
files (``tokenization.gpt2_files``). Each function imports the library when called: a training
run, which needs only the vocabulary's size and EOD id, never loads it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Iterable

from tokenization.gpt2_files import EOD_TOKEN, TokenizerFileError

MIN_VOCAB = 257
"""256 byte tokens and the end-of-document token: the least a byte-level BPE holds."""


def load_byte_level_bpe(vocab_file: str, merge_file: str):
    """A ``tokenizers`` tokenizer that encodes as GPT-2's does: byte-level pre-tokenization with
    GPT-2's split regex, no prefix space, no special tokens added to the text."""
    from tokenizers import ByteLevelBPETokenizer

    try:
        return ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False, trim_offsets=False)
    except Exception as error:  # noqa: BLE001 -- the Rust side raises a plain Exception on bad files
        raise TokenizerFileError(f"cannot read the BPE files {vocab_file} and {merge_file}: {error}") from None


def train_byte_level_bpe(documents: Iterable[str], vocab_size: int, vocab_file: str, merge_file: str,
                         min_frequency: int = 2) -> int:
    """Train a byte-level BPE of ``vocab_size`` entries (256 bytes, ``<|endoftext|>`` and the
    merges) on ``documents`` and write ``vocab_file`` and ``merge_file``; returns the size of the
    vocabulary it reached (less than asked when the corpus has too few pairs that repeat)."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} entries "
                         "(256 bytes and the end-of-document token)")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(documents, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOD_TOKEN], show_progress=sys.stderr.isatty())
    # save_model names the files <prefix>-vocab.json/-merges.txt in one folder: write them
    # there, then move them to the names asked for.
    for path in (vocab_file, merge_file):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(vocab_file))) as tmp:
        written_vocab, written_merges = bpe.save_model(tmp)
        shutil.move(written_vocab, vocab_file)
        shutil.move(written_merges, merge_file)
    return bpe.get_vocab_size()

