"""Kept only for ``trainer/arguments.py``'s import until it names ``tokenization.tokenizer``;
the tokenizers live in the ``tokenization`` package."""

from tokenization.tokenizer import build_tokenizer  # noqa: F401
