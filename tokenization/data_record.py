"""The tokenizer a dataset was prepared with, recorded beside it: ``PREFIX.tokenizer.json``.

Token ids mean nothing without their tokenizer, and the ``.bin``/``.idx`` pair does not say which
one made them: training such data with another tokenizer (or the default byte tokenizer) crashes
at the first step inside the embedding, or trains on garbage. ``scripts/prepare_data.py`` writes
the record; the trainer's argument check (``trainer/arguments.py``) takes its tokenizer as the
default and refuses one that differs, and a vocabulary smaller than the data's largest id,
before a process group exists.

    {"tokenizer_type": "GPT2BPETokenizer", "vocab_size": 4096, "max_token_id": 4095,
     "files": {"vocab_file": "/abs/vocab.json", "merge_file": "/abs/merges.txt"},
     "files_xxh3": "9f0c..."}
"""

from __future__ import annotations

import json
import os

import xxhash

FILE_FLAGS = {"vocab_file": "--vocab-file", "merge_file": "--merge-file", "tokenizer_model": "--tokenizer-model"}


def record_path(prefix: str) -> str:
    return f"{prefix}.tokenizer.json"


def files_checksum(files: dict[str, str | None]) -> str | None:
    """xxh3-64 over the tokenizer's own files (a directory: its ``tokenizer.json``), in flag order."""
    digest = xxhash.xxh3_64()
    found = False
    for name in FILE_FLAGS:
        path = files.get(name)
        if not path:
            continue
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with open(path, "rb") as f:
            digest.update(f.read())
        found = True
    return digest.hexdigest() if found else None


def write_record(prefix: str, tokenizer_type: str, vocab_size: int, max_token_id: int,
                 files: dict[str, str | None]) -> str:
    files = {k: os.path.abspath(v) for k, v in files.items() if v}
    record = {"tokenizer_type": tokenizer_type, "vocab_size": vocab_size, "max_token_id": max_token_id,
              "files": files, "files_xxh3": files_checksum(files)}
    path = record_path(prefix)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def read_record(prefix: str) -> dict | None:
    """The record of ``prefix`` (None: data prepared before records were written)."""
    path = record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({error}); prepare the data again with scripts/prepare_data.py") \
            from None
    if not isinstance(record, dict) or not isinstance(record.get("tokenizer_type"), str) \
            or not isinstance(record.get("max_token_id"), int):
        raise ValueError(f"{path} is not a tokenizer record; prepare the data again with scripts/prepare_data.py")
    return record
