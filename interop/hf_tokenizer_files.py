"""The tokenizer files of an exported model: which ones a run used, and the ``transformers``
files around them (``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``);
and on import, the tokenizer of a ``transformers`` directory to train with.

- ``GPT2BPETokenizer``: the run's ``--vocab-file``/``--merge-file`` (recorded in the checkpoint;
  the converter's own flags override them when the files have moved).
- ``ByteTokenizer``: a byte-level BPE without merges whose ids are the bytes and ``<|endoftext|>``
  256 (``tokenization.gpt2_files.write_byte_vocabulary``): ``transformers``' GPT-2 tokenizer then encodes
  exactly as ``ByteTokenizer`` does.
- ``HuggingFaceTokenizer``: the run's ``--tokenizer-model`` directory's ``tokenizer.json``, with its
  ``tokenizer_config.json`` and ``special_tokens_map.json`` when it has them (else ones naming the
  run's EOD, so that ``AutoTokenizer`` adds no special token of a class's own).
- ``NullTokenizer``: the data were token ids; there is no tokenizer to export.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from interop.gpt2_mapping import GPT2ConversionError
from tokenization.gpt2_files import EOD_TOKEN, write_byte_vocabulary
from tokenization.hf_tokenizer import CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE, write_tokenizer_config
from tokenization.tokenizer import HuggingFaceTokenizer, build_tokenizer

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


def _check_vocab_size(tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size != vocab_size:
        raise GPT2ConversionError(f"the tokenizer has {tokenizer.vocab_size} entries, the checkpoint's model "
                                  f"{vocab_size}: these are not the run's tokenizer files")


def _export_tokenizer_json(source: str | None, vocab_size: int, out_dir: str, max_length: int) -> TokenizerExport:
    """The run's ``--tokenizer-model`` directory copied; tokenizer_config.json written when it has none."""
    if not source or not os.path.isfile(os.path.join(source, TOKENIZER_FILE)):
        raise GPT2ConversionError(
            f"the run's tokenizer {os.path.join(source, TOKENIZER_FILE) if source else '(not recorded)'} is not "
            "there: pass convert_checkpoint.py --tokenizer-model DIR (where it is now), or put it back where the "
            "checkpoint recorded it")
    tokenizer = HuggingFaceTokenizer(source)  # the EOD the run trained with
    _check_vocab_size(tokenizer, vocab_size)
    names = [name for name in (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE)
             if os.path.isfile(os.path.join(source, name))]
    if CONFIG_FILE not in names:  # then both files are generated: they name the run's EOD
        names = [TOKENIZER_FILE]
    for name in names:
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    if CONFIG_FILE not in names:
        names += write_tokenizer_config(out_dir, tokenizer.eod_token, max_length)
    return TokenizerExport("HuggingFaceTokenizer", tokenizer.eod, tuple(names))


def export_tokenizer(run_args: dict, vocab_size: int, out_dir: str, max_length: int,
                     vocab_file: str | None = None, merge_file: str | None = None,
                     tokenizer_model: str | None = None) -> TokenizerExport:
    """Write the run's tokenizer into ``out_dir`` in ``transformers``' layout; raises
    :class:`GPT2ConversionError` when its files are gone or are not the checkpoint's vocabulary.
    ``vocab_file``/``merge_file``/``tokenizer_model`` replace the paths the run recorded (files moved since)."""
    kind = run_args.get("tokenizer_type", "NullTokenizer")
    if kind == "NullTokenizer":
        return TokenizerExport(kind, vocab_size - 1, ())
    if kind == "HuggingFaceTokenizer":
        return _export_tokenizer_json(tokenizer_model or run_args.get("tokenizer_model"), vocab_size, out_dir,
                                      max_length)
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
    _check_vocab_size(tokenizer, vocab_size)
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
                   "add_bos_token": False, "errors": "replace", **special}, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return TokenizerExport(kind, tokenizer.eod, (VOCAB_NAME, MERGES_NAME, "tokenizer_config.json",
                                                 "special_tokens_map.json"))


def import_tokenizer(hf_dir: str, out_dir: str, vocab_size: int, notes: list[str]) -> dict:
    """Copy the tokenizer of the ``transformers`` directory ``hf_dir`` beside an imported
    checkpoint in ``out_dir``; returns the :class:`trainer.config.JobConfig` tokenizer fields to
    train with (``tokenizer_type`` and the absolute file paths), empty when there is none.

    GPT-2's ``vocab.json``/``merges.txt`` when present (``GPT2BPETokenizer``: training then reads
    them with json alone), else ``tokenizer.json`` with its ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (``HuggingFaceTokenizer`` with ``--tokenizer-model out_dir``: a
    Llama's, for one). A vocabulary of another size than the model's is kept, with a note."""
    vocab, merges = os.path.join(hf_dir, VOCAB_NAME), os.path.join(hf_dir, MERGES_NAME)
    if os.path.isfile(vocab) and os.path.isfile(merges):
        args = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": os.path.abspath(os.path.join(out_dir, VOCAB_NAME)),
                "merge_file": os.path.abspath(os.path.join(out_dir, MERGES_NAME))}
        shutil.copyfile(vocab, args["vocab_file"])
        shutil.copyfile(merges, args["merge_file"])
    elif os.path.isfile(os.path.join(hf_dir, TOKENIZER_FILE)):
        for name in (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE):
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
        args = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.abspath(out_dir)}
    else:
        notes.append(f"no {VOCAB_NAME}/{MERGES_NAME} or {TOKENIZER_FILE} in {hf_dir}: train with your own tokenizer "
                     f"of {vocab_size} entries")
        return {}
    size = build_tokenizer(**args).vocab_size
    if size != vocab_size:
        notes.append(f"the tokenizer has {size} entries, the model's vocabulary {vocab_size}: the trainer refuses a "
                     "checkpoint of another vocabulary size, so train with --vocab-size and ids of your own")
    return args


def tokenizer_flags(tokenizer_args: dict, load_dir: str) -> list[str]:
    """The ``pretrain_gpt.py`` tokenizer flags of :func:`import_tokenizer`'s fields, with the files
    named under ``load_dir`` as the user spelled it (the files sit beside the checkpoint)."""
    kind = tokenizer_args["tokenizer_type"]
    if kind == "HuggingFaceTokenizer":
        return ["--tokenizer-type", kind, "--tokenizer-model", load_dir]
    return ["--tokenizer-type", kind, "--vocab-file", os.path.join(load_dir, VOCAB_NAME),
            "--merge-file", os.path.join(load_dir, MERGES_NAME)]
