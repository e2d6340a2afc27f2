"""The tokenizer recorded with prepared data (``tokenization.data_record``): training takes it
as the default and refuses another one, or a vocabulary too small, before anything starts."""

import json

import pytest

from tokenization.data_record import read_record, record_path, write_record
from tokenization.tokenizer import build_tokenizer
from trainer.arguments import ArgumentError, parse_job_config
from trainer.prepare import build_indexed_dataset

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1"]
TEXT = ["the cat sat on the mat. " * 20, "a dog and a cat and a mat. " * 20]


def prepare(prefix, tokenizer_type, **files):
    """What scripts/prepare_data.py does: the dataset, then its record."""
    if tokenizer_type == "GPT2BPETokenizer" and not files:
        from tokenization.bpe import train_byte_level_bpe

        files = {"vocab_file": f"{prefix}-vocab.json", "merge_file": f"{prefix}-merges.txt"}
        train_byte_level_bpe(iter(TEXT), 300, files["vocab_file"], files["merge_file"])
    vocab = files.pop("vocab_size", None)
    tokenizer = build_tokenizer(tokenizer_type, vocab, **files)
    counts = build_indexed_dataset(iter(TEXT), tokenizer, prefix)
    write_record(prefix, tokenizer_type, tokenizer.vocab_size, counts["max_token_id"], files)
    return files


def test_the_recorded_tokenizer_is_the_default(tmp_path):
    prefix = str(tmp_path / "bpe")
    files = prepare(prefix, "GPT2BPETokenizer")
    job = parse_job_config(MODEL + ["--data-path", prefix])
    assert job.tokenizer_type == "GPT2BPETokenizer" and job.vocab_file == files["vocab_file"]
    assert job.model.vocab_size >= read_record(prefix)["max_token_id"] + 1


def test_another_tokenizer_type_is_refused_naming_both(tmp_path):
    prefix = str(tmp_path / "bpe")
    prepare(prefix, "GPT2BPETokenizer")
    with pytest.raises(ArgumentError, match="--tokenizer-type ByteTokenizer, but --data-path .* was prepared with "
                                            "GPT2BPETokenizer"):
        parse_job_config(MODEL + ["--data-path", prefix, "--tokenizer-type", "ByteTokenizer"])


def test_other_tokenizer_files_are_refused(tmp_path):
    prefix = str(tmp_path / "bpe")
    prepare(prefix, "GPT2BPETokenizer")
    other = prepare(str(tmp_path / "other"), "GPT2BPETokenizer")
    # the same corpus trains the same BPE: make the other one differ
    with open(other["vocab_file"]) as f:
        vocab = json.load(f)
    vocab["zzz-not-in-the-first"] = len(vocab)
    with open(other["vocab_file"], "w") as f:
        json.dump(vocab, f)
    with pytest.raises(ArgumentError, match="differ from the tokenizer --data-path"):
        parse_job_config(MODEL + ["--data-path", prefix, "--vocab-file", other["vocab_file"],
                                  "--merge-file", other["merge_file"]])


def test_a_vocabulary_smaller_than_the_datas_ids_is_refused_before_the_first_step(tmp_path):
    prefix = str(tmp_path / "null")
    prepare(prefix, "ByteTokenizer")  # ids up to 256 (bytes and the end of a document)
    record = read_record(prefix)
    record.update(tokenizer_type="NullTokenizer", vocab_size=1024, max_token_id=900)
    with open(record_path(prefix), "w") as f:
        json.dump(record, f)
    with pytest.raises(ArgumentError, match="holds token id 900, but this run's vocabulary"):
        parse_job_config(MODEL + ["--data-path", prefix, "--vocab-size", "512"])
    assert parse_job_config(MODEL + ["--data-path", prefix]).model.vocab_size == 1024  # the record's


def test_data_prepared_before_records_still_trains_with_the_byte_tokenizer(tmp_path):
    prefix = str(tmp_path / "old")
    prepare(prefix, "ByteTokenizer")
    (tmp_path / "old.tokenizer.json").unlink()
    assert parse_job_config(MODEL + ["--data-path", prefix]).tokenizer_type == "ByteTokenizer"
    job = parse_job_config(MODEL + ["--data-path", prefix])
    from trainer.data import prefixes_without_record

    assert prefixes_without_record(job.data) == [prefix]  # pretrain warns about each of them


def test_a_token_past_the_vocabulary_stops_with_the_prefix_named_not_deep_in_the_embedding(tmp_path):
    """Data without a record, read with a tokenizer smaller than the one it was prepared with:
    the sample that holds a too-large id is refused by name (a DataError), before the model sees it."""
    from trainer.data import DataError, build_dataset

    prefix = str(tmp_path / "old")
    prepare(prefix, "ByteTokenizer")  # ids up to 256
    (tmp_path / "old.tokenizer.json").unlink()
    job = parse_job_config(MODEL + ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
    dataset = build_dataset(job.data, "train", job.model.vocab_size, seed=1)
    with pytest.raises(DataError, match=f"--data-path {prefix}: token id .* is past this run's vocabulary of 100"):
        dataset.sample(0)
    assert int(build_dataset(job.data, "train", 257, seed=1).sample(0).max()) < 257  # the right vocabulary reads it
