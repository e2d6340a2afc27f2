"""Byte-level BPE through the ``tokenizers`` library: train one on a corpus and load GPT-2 style
files (``tokenization.gpt2_files``), or write it as a ``tokenizer.json`` directory
(``tokenization.hf_tokenizer``). Each function imports the library when called: a training
run, which needs only the vocabulary's size and EOD id, never loads it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Iterable

from tokenization.gpt2_files import EOD_TOKEN, TokenizerFileError
from tokenization.hf_tokenizer import TOKENIZER_FILE, write_tokenizer_config

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


def _train(documents: Iterable[str], vocab_size: int, min_frequency: int):
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} entries "
                         "(256 bytes and the end-of-document token)")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(documents, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOD_TOKEN], show_progress=sys.stderr.isatty())
    return bpe


def train_byte_level_bpe(documents: Iterable[str], vocab_size: int, vocab_file: str, merge_file: str,
                         min_frequency: int = 2) -> int:
    """Train a byte-level BPE of ``vocab_size`` entries (256 bytes, ``<|endoftext|>`` and the
    merges) on ``documents`` and write ``vocab_file`` and ``merge_file``; returns the size of the
    vocabulary it reached (less than asked when the corpus has too few pairs that repeat)."""
    bpe = _train(documents, vocab_size, min_frequency)
    # save_model names the files <prefix>-vocab.json/-merges.txt in one folder: write them
    # there, then move them to the names asked for.
    for path in (vocab_file, merge_file):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(vocab_file))) as tmp:
        written_vocab, written_merges = bpe.save_model(tmp)
        shutil.move(written_vocab, vocab_file)
        shutil.move(written_merges, merge_file)
    return bpe.get_vocab_size()



def train_byte_level_bpe_dir(documents: Iterable[str], vocab_size: int, directory: str, min_frequency: int = 2) -> int:
    """The same BPE as :func:`train_byte_level_bpe`, written as a ``transformers`` tokenizer
    directory (``tokenizer.json`` with ``tokenizer_config.json`` and ``special_tokens_map.json``):
    what ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`` reads and
    ``AutoTokenizer.from_pretrained(DIR)`` loads. Refuses a directory that already holds a
    tokenizer.json (a downloaded tokenizer is not overwritten); returns the vocabulary's size."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.exists(path):
        raise TokenizerFileError(f"{path} exists: --train-tokenizer writes a new tokenizer, it does not replace one; "
                                 "pass another --tokenizer-model directory, or remove that one")
    bpe = _train(documents, vocab_size, min_frequency)
    os.makedirs(directory, exist_ok=True)
    bpe.save(path)
    write_tokenizer_config(directory, EOD_TOKEN)
    return bpe.get_vocab_size()
