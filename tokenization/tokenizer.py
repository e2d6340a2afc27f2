"""Tokenizers that need no download.

``ByteTokenizer`` maps UTF-8 bytes to ids 0-255 and ends documents with id 256 (EOD): any text,
no vocabulary file. ``NullTokenizer`` is for data that is already token ids (``--vocab-size``).
``GPT2BPETokenizer`` is Megatron-LM's: a byte-level BPE given by ``--vocab-file`` (vocab.json)
and ``--merge-file`` (merges.txt), GPT-2's own files or ones trained on your corpus
(``scripts/prepare_data.py --train-tokenizer``). ``HuggingFaceTokenizer`` is Megatron-LM's too:
``--tokenizer-model DIR``, a local directory holding a ``tokenizer.json`` (``tokenization.hf_tokenizer``).

Training needs only a tokenizer's vocabulary size and EOD id, which ``GPT2BPETokenizer`` reads
from vocab.json with the standard library; only encoding and decoding text (data preparation,
export) loads the ``tokenizers`` library, through ``tokenization.bpe``. So training never imports it,
except with ``HuggingFaceTokenizer``, whose vocabulary is only known through that library.
"""

from __future__ import annotations

import os

from tokenization.gpt2_files import EOD_TOKEN, TokenizerFileError, read_bpe_vocab
from tokenization.hf_tokenizer import HuggingFaceTokenizer

TOKENIZER_TYPES = ("ByteTokenizer", "NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer")


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus an end-of-document token."""

    vocab_size = 257
    eod = 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class NullTokenizer:
    """Token ids given as whitespace-separated integers; EOD is ``vocab_size - 1``."""

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        ids = [int(t) for t in text.split()]
        bad = [i for i in ids if not 0 <= i < self.eod]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.eod}) for NullTokenizer")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(i) for i in ids)


class GPT2BPETokenizer:
    """Megatron-LM's ``GPT2BPETokenizer``: byte-level BPE from ``vocab.json`` and ``merges.txt``;
    EOD is ``<|endoftext|>``'s id; the vocabulary size is the number of entries of vocab.json."""

    def __init__(self, vocab_file: str, merge_file: str):
        if not vocab_file or not merge_file:
            raise TokenizerFileError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file "
                                     "(GPT-2's vocab.json and merges.txt, or train your own with "
                                     "scripts/prepare_data.py --train-tokenizer)")
        if not os.path.isfile(merge_file):
            raise TokenizerFileError(f"--merge-file {merge_file} does not exist")
        vocab = read_bpe_vocab(vocab_file)
        if EOD_TOKEN not in vocab:
            raise TokenizerFileError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} entry (the end-of-document "
                                     "token); add it, or train the tokenizer with scripts/prepare_data.py")
        self.vocab_file = vocab_file
        self.merge_file = merge_file
        self.vocab_size = len(vocab)
        self.eod = vocab[EOD_TOKEN]
        self._bpe = None

    def _encoder(self):
        if self._bpe is None:
            from tokenization.bpe import load_byte_level_bpe  # the `tokenizers` library: only to encode text

            self._bpe = load_byte_level_bpe(self.vocab_file, self.merge_file)
        return self._bpe

    def tokenize(self, text: str) -> list[int]:
        return self._encoder().encode(text).ids

    def detokenize(self, ids) -> str:
        return self._encoder().decode(list(ids))


def build_tokenizer(tokenizer_type: str, vocab_size: int | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, tokenizer_model: str | None = None):
    if tokenizer_type != "GPT2BPETokenizer" and (vocab_file or merge_file):
        raise ValueError(f"--vocab-file and --merge-file are for --tokenizer-type GPT2BPETokenizer, not {tokenizer_type}")
    if tokenizer_type != "HuggingFaceTokenizer" and tokenizer_model:
        raise ValueError(f"--tokenizer-model is for --tokenizer-type HuggingFaceTokenizer, not {tokenizer_type}: "
                         "pass --tokenizer-type HuggingFaceTokenizer to read its tokenizer.json")
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")
