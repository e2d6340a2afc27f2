"""GPT2BPETokenizer (Megatron-LM's flags: --tokenizer-type GPT2BPETokenizer --vocab-file
--merge-file): a byte-level BPE trained on a corpus with the `tokenizers` library, the byte
vocabulary that makes it ByteTokenizer, and the refused arguments. That training never imports
the Hugging Face libraries is tests/test_training_without_hugging_face.py's (a process of its own)."""

import json
import random

import pytest

from tokenization.bpe import train_byte_level_bpe
from tokenization.gpt2_files import EOD_TOKEN, TokenizerFileError, write_byte_vocabulary
from tokenization.tokenizer import ByteTokenizer, GPT2BPETokenizer, build_tokenizer
from trainer.arguments import ArgumentError, parse_job_config

WORDS = "the king queen lord lady speak shall thou thee thy good night sweet prince love death".split()


def corpus(documents: int = 20, words: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + ".\n" for _ in range(documents)]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe") / "not-yet"  # the folders are made
    vocab, merges = str(d / "vocab.json"), str(d / "merges.txt")
    reached = train_byte_level_bpe(corpus(), 300, vocab, merges)
    return vocab, merges, reached


def test_a_trained_bpe_compresses_and_round_trips(bpe_files):
    vocab, merges, reached = bpe_files
    tokenizer = GPT2BPETokenizer(vocab, merges)
    assert tokenizer.vocab_size == reached == 300
    assert tokenizer.eod == json.loads(open(vocab).read())[EOD_TOKEN]
    text = "the sweet prince shall speak, thou lord of night"
    ids = tokenizer.tokenize(text)
    assert len(ids) < len(text.encode()) / 2  # the corpus's words are single tokens
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize("naïve ☃") and tokenizer.detokenize(tokenizer.tokenize("naïve ☃")) == "naïve ☃"


def test_byte_vocabulary_is_the_byte_tokenizer(tmp_path):
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    write_byte_vocabulary(vocab, merges)
    bpe, byte = GPT2BPETokenizer(vocab, merges), ByteTokenizer()
    text = "To be, or not to be: naïve ☃\n\ttabs  and  spaces"
    assert (bpe.vocab_size, bpe.eod) == (byte.vocab_size, byte.eod)
    assert bpe.tokenize(text) == byte.tokenize(text)
    assert bpe.detokenize(byte.tokenize(text)) == text


def test_missing_or_malformed_files_are_named(tmp_path, bpe_files):
    vocab, merges, _ = bpe_files
    with pytest.raises(TokenizerFileError, match="needs --vocab-file and --merge-file"):
        GPT2BPETokenizer(None, None)
    with pytest.raises(TokenizerFileError, match=f"--merge-file {tmp_path}/none.txt does not exist"):
        GPT2BPETokenizer(vocab, str(tmp_path / "none.txt"))
    (tmp_path / "v.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(TokenizerFileError, match="no <\\|endoftext\\|> entry"):
        GPT2BPETokenizer(str(tmp_path / "v.json"), merges)
    (tmp_path / "gap.json").write_text(json.dumps({"a": 0, EOD_TOKEN: 2}))
    with pytest.raises(TokenizerFileError, match="ids are not 0..1"):
        GPT2BPETokenizer(str(tmp_path / "gap.json"), merges)
    with pytest.raises(ValueError, match="are for --tokenizer-type GPT2BPETokenizer"):
        build_tokenizer("ByteTokenizer", vocab_file=vocab)


def _data(tmp_path):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c{suffix}").write_bytes(b"")
    return ["--model-size", "tiny", "--data-path", str(tmp_path / "c"), "--train-iters", "1", "--lr", "1"]


def test_training_takes_megatron_lms_flags(tmp_path, bpe_files, monkeypatch):
    vocab, merges, _ = bpe_files
    monkeypatch.chdir(tmp_path)
    job = parse_job_config(_data(tmp_path) + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                                              "--merge-file", merges], world_size=1)
    assert job.model.vocab_size == 300 and job.tokenizer_type == "GPT2BPETokenizer"
    assert (job.vocab_file, job.merge_file) == (vocab, merges)  # absolute: the checkpoint records them
    with pytest.raises(ArgumentError, match="drop --vocab-size"):
        parse_job_config(_data(tmp_path) + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                                            "--merge-file", merges, "--vocab-size", "300"], world_size=1)
    with pytest.raises(ArgumentError, match="needs --vocab-file and --merge-file"):
        parse_job_config(_data(tmp_path) + ["--tokenizer-type", "GPT2BPETokenizer"], world_size=1)


def test_a_vocabulary_smaller_than_the_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        train_byte_level_bpe(corpus(2), 100, str(tmp_path / "v.json"), str(tmp_path / "m.txt"))

