"""Tokenizers that need no download.

``ByteTokenizer`` maps UTF-8 bytes to ids 0-255 and ends documents with id 256 (EOD): any text,
no vocabulary file. ``NullTokenizer`` is for data that is already token ids (``--vocab-size``).
"""

from __future__ import annotations

TOKENIZER_TYPES = ("ByteTokenizer", "NullTokenizer")


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


def build_tokenizer(tokenizer_type: str, vocab_size: int | None = None):
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise ValueError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")
