"""GPT-2's tokenizer files, read and written with the standard library.

``vocab.json`` maps each token, spelled over GPT-2's byte-to-unicode alphabet, to its id;
``merges.txt`` holds one merge per line. Megatron-LM's ``GPT2BPETokenizer``, ``transformers``'
``GPT2Tokenizer`` and this trainer (``--vocab-file/--merge-file``) all read them.
"""

from __future__ import annotations

import json

EOD_TOKEN = "<|endoftext|>"
"""GPT-2's end-of-document token; Megatron-LM's GPT2BPETokenizer takes its id as EOD."""


class TokenizerFileError(ValueError):
    """A vocabulary or merges file is missing or malformed; the message names the file and the fix."""


def read_bpe_vocab(vocab_file: str) -> dict[str, int]:
    """The token -> id table of a GPT-2 style ``vocab.json``, checked to be ids 0..n-1."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise TokenizerFileError(f"--vocab-file {vocab_file} does not exist") from None
    except (OSError, json.JSONDecodeError) as error:
        raise TokenizerFileError(f"--vocab-file {vocab_file} is not a GPT-2 vocab.json: {error}") from None
    if not isinstance(vocab, dict) or not vocab or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerFileError(f"--vocab-file {vocab_file} is not a GPT-2 vocab.json (a token -> id object)")
    if sorted(vocab.values()) != list(range(len(vocab))):
        # The model's vocabulary size is the number of entries (Megatron-LM's rule): a gap
        # would give an id past the embedding table.
        raise TokenizerFileError(f"--vocab-file {vocab_file}: the ids are not 0..{len(vocab) - 1}")
    return vocab


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (openai/gpt-2, encoder.py):
    printable Latin-1 bytes map to themselves, the others to characters from U+0100 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_byte_vocabulary(vocab_file: str, merge_file: str) -> None:
    """Files of the byte-level BPE without merges whose ids are ``ByteTokenizer``'s: byte b is
    id b, ``<|endoftext|>`` is 256. A run trained with ``ByteTokenizer`` is exported with them."""
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab[EOD_TOKEN] = 256
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merge_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
