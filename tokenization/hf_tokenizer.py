"""Megatron-LM's ``HuggingFaceTokenizer``: ``--tokenizer-model DIR`` names a local directory that
holds a ``tokenizer.json`` (the ``tokenizers`` library's file, what ``save_pretrained`` of a fast
tokenizer writes), read with the ``tokenizers`` library.

Nothing is downloaded: Megatron-LM passes the argument to ``AutoTokenizer.from_pretrained``, which
fetches a hub name such as ``gpt2``; here only a directory on disk is accepted, so a job never
depends on the network or on a hub revision that changed since the data were prepared.

The library is imported when such a tokenizer is built, never at module import: training with
the other tokenizer types does not need it.
"""

from __future__ import annotations

import json
import os

from tokenization.gpt2_files import EOD_TOKEN, TokenizerFileError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
"""End-of-document tokens of common tokenizers (GPT-2 and its kin, Llama 3, Llama 2/T5, Gemma),
tried in this order when neither ``tokenizer_config.json`` nor ``special_tokens_map.json`` names
an ``eos_token``."""


def _named_eos(directory: str) -> str | None:
    """The ``eos_token`` that ``transformers``' files beside tokenizer.json name, if any: what
    Megatron-LM's HuggingFaceTokenizer takes as EOD (``eos_token_id``)."""
    for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise TokenizerFileError(f"{path} is not a transformers {name}: {error}") from None
        if isinstance(eos, dict):  # an AddedToken written out: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def load_tokenizer_json(tokenizer_model: str):
    """The ``tokenizers.Tokenizer`` of ``tokenizer_model``/tokenizer.json; refuses anything that
    is not a local directory holding that file."""
    if not tokenizer_model:
        raise TokenizerFileError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR: a local "
                                 f"directory holding {TOKENIZER_FILE} (a transformers save_pretrained directory, "
                                 "or scripts/prepare_data.py --train-tokenizer's)")
    if not os.path.isdir(tokenizer_model):
        raise TokenizerFileError(
            f"--tokenizer-model {tokenizer_model} is not a directory: HuggingFaceTokenizer reads a local directory "
            f"holding {TOKENIZER_FILE} and downloads nothing; for a hub tokenizer, download it first (e.g. "
            f"`huggingface-cli download NAME {TOKENIZER_FILE} {CONFIG_FILE} --local-dir DIR`) and pass DIR")
    path = os.path.join(tokenizer_model, TOKENIZER_FILE)
    if not os.path.isfile(path):
        found = sorted(os.listdir(tokenizer_model))
        hint = (" (vocab.json and merges.txt are GPT2BPETokenizer's: --vocab-file and --merge-file)"
                if {"vocab.json", "merges.txt"} <= set(found) else "")
        raise TokenizerFileError(
            f"--tokenizer-model {tokenizer_model} has no {TOKENIZER_FILE} (it holds {found[:6] or 'nothing'}){hint}; "
            f"save a fast tokenizer there with transformers' save_pretrained, or train one with "
            f"scripts/prepare_data.py --tokenizer-type HuggingFaceTokenizer --train-tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerFileError("--tokenizer-type HuggingFaceTokenizer needs the `tokenizers` library: "
                                 "pip install -e .[hf] (or pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # noqa: BLE001 -- the Rust side raises a plain Exception on a bad file
        raise TokenizerFileError(f"cannot read {path}: {error}") from None


class HuggingFaceTokenizer:
    """A ``tokenizer.json`` directory. The vocabulary size covers every id, added tokens included;
    EOD is the ``eos_token`` that tokenizer_config.json names, else the first of
    :data:`EOD_CANDIDATES` in the vocabulary."""

    def __init__(self, tokenizer_model: str):
        self._tokenizer = load_tokenizer_json(tokenizer_model)
        self.tokenizer_model = tokenizer_model
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerFileError(f"--tokenizer-model {tokenizer_model}: {TOKENIZER_FILE} has an empty vocabulary")
        # One past the largest id, not the number of entries: a vocabulary with a gap (or an
        # added token counted twice) would otherwise give an id past the embedding table.
        self.vocab_size = max(vocab.values()) + 1
        named = _named_eos(tokenizer_model)
        if named is not None and named not in vocab:
            raise TokenizerFileError(f"--tokenizer-model {tokenizer_model}: its eos_token {named!r} is not in "
                                     f"{TOKENIZER_FILE}'s vocabulary; fix eos_token in {CONFIG_FILE}")
        self.eod_token = named or next((t for t in EOD_CANDIDATES if t in vocab), None)
        if self.eod_token is None:
            raise TokenizerFileError(
                f"--tokenizer-model {tokenizer_model}: no end-of-document token: {CONFIG_FILE} names no eos_token "
                f"and {TOKENIZER_FILE} has none of {', '.join(EOD_CANDIDATES)}; add one as a special token, or "
                f"name yours as eos_token in {CONFIG_FILE}")
        self.eod = vocab[self.eod_token]

    def tokenize(self, text: str) -> list[int]:
        # No BOS/EOS from the post-processor: each document is ended by EOD when it is stored
        # (trainer.prepare), as with every tokenizer here; a template's EOS would double it.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(list(ids))


def write_tokenizer_config(directory: str, eod_token: str, max_length: int | None = None) -> tuple[str, str]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` that make ``transformers``'
    ``AutoTokenizer.from_pretrained(directory)`` load tokenizer.json as it is: the generic fast
    class, whose only special token is the EOD (a GPT-2 class would add its own
    ``<|endoftext|>`` to a vocabulary without one). Returns the two file names."""
    special = {"bos_token": eod_token, "eos_token": eod_token}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
    if max_length is not None:
        config["model_max_length"] = max_length
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, SPECIAL_TOKENS_FILE), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return CONFIG_FILE, SPECIAL_TOKENS_FILE
