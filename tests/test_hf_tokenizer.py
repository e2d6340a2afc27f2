"""HuggingFaceTokenizer (Megatron-LM's flags: --tokenizer-type HuggingFaceTokenizer --tokenizer-model
DIR): a local tokenizer.json directory read with the `tokenizers` library, never downloaded; the
refused arguments; scripts/prepare_data.py reading and writing one; and its way into and out of
a Hugging Face export (interop.hf_tokenizer_files)."""

import dataclasses
import json
import random

import pytest

from interop.gpt2_mapping import GPT2ConversionError
from interop.hf_tokenizer_files import export_tokenizer, import_tokenizer, tokenizer_flags
from tests.test_bpe_tokenizer import _data  # an empty dataset and the tiny model's flags
from tokenization.gpt2_files import TokenizerFileError, write_byte_vocabulary
from tokenization.hf_tokenizer import HuggingFaceTokenizer
from tokenization.tokenizer import build_tokenizer
from trainer.arguments import ArgumentError, parse_job_config

tokenizers = pytest.importorskip("tokenizers")

WORDS = "the king queen lord lady speak shall thou thee thy good night sweet prince love death".split()


def sentences(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


def word_level_dir(path, specials=("[UNK]", "</s>"), eos_template=True):
    """A tiny WordLevel tokenizer.json in ``path``: whitespace words, the given special tokens and
    (``eos_template``) a post-processor that appends ``</s>`` as Llama 2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins the words with spaces
    tok.train_from_iterator(sentences(), trainers.WordLevelTrainer(special_tokens=list(specials)))
    if eos_template:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return str(path)


@pytest.fixture
def word_dir(tmp_path):
    return word_level_dir(tmp_path / "words")


def test_a_tokenizer_json_directory_round_trips(word_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=word_dir)
    raw = tokenizers.Tokenizer.from_file(f"{word_dir}/tokenizer.json")
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == len(WORDS) + 2
    assert tok.eod == raw.token_to_id("</s>") and tok.eod_token == "</s>"
    text = "the sweet prince shall speak thou lord of night"  # "of" is not in the vocabulary
    ids = tok.tokenize(text)
    assert len(ids) == 9 and ids[-1] != tok.eod  # the template's </s> is not added: EOD ends documents
    assert ids[7] == raw.token_to_id("[UNK]")
    assert tok.detokenize(ids) == text.replace(" of ", " ")  # special tokens are not text, as with GPT2BPETokenizer


def test_the_eod_is_tokenizer_configs_eos_token(tmp_path):
    directory = word_level_dir(tmp_path / "w", specials=("[UNK]", "</s>", "<|end_of_text|>", "<|eot|>"))
    raw = tokenizers.Tokenizer.from_file(f"{directory}/tokenizer.json")
    assert HuggingFaceTokenizer(directory).eod == raw.token_to_id("<|end_of_text|>")  # the candidates' order
    # transformers writes eos_token as a string or as an AddedToken's fields
    (tmp_path / "w" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot|>"}}))
    assert HuggingFaceTokenizer(directory).eod == raw.token_to_id("<|eot|>")
    (tmp_path / "w" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(TokenizerFileError, match="eos_token '<\\|im_end\\|>' is not in tokenizer.json's vocabulary"):
        HuggingFaceTokenizer(directory)


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    directory = word_level_dir(tmp_path / "w", specials=("[UNK]",), eos_template=False)
    with pytest.raises(TokenizerFileError, match="no end-of-document token.*<\\|endoftext\\|>, <\\|end_of_text\\|>, </s>"):
        HuggingFaceTokenizer(directory)


def test_only_a_local_directory_with_tokenizer_json_is_read(tmp_path):
    with pytest.raises(TokenizerFileError, match="--tokenizer-model gpt2 is not a directory.*downloads nothing"):
        HuggingFaceTokenizer("gpt2")  # a hub name: never fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerFileError, match=f"--tokenizer-model {tmp_path}/empty has no tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path / "empty"))
    write_byte_vocabulary(str(tmp_path / "empty" / "vocab.json"), str(tmp_path / "empty" / "merges.txt"))
    with pytest.raises(TokenizerFileError, match="are GPT2BPETokenizer's: --vocab-file and --merge-file"):
        HuggingFaceTokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match=f"cannot read {tmp_path}/bad/tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path / "bad"))


def test_training_takes_megatron_lms_flags(tmp_path, word_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = parse_job_config(_data(tmp_path) + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "words"],
                           world_size=1)
    assert job.tokenizer_type == "HuggingFaceTokenizer" and job.model.vocab_size == len(WORDS) + 2
    assert job.tokenizer_model == word_dir  # made absolute
    # what the checkpoint saves as the run's arguments (trainer.checkpoint_state), for the export
    assert dataclasses.asdict(job)["tokenizer_model"] == word_dir


@pytest.mark.parametrize("extra, message", [
    (["--tokenizer-type", "HuggingFaceTokenizer"], "HuggingFaceTokenizer needs --tokenizer-model DIR"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "words", "--vocab-size", "18"],
     "the vocabulary is --tokenizer-model's; drop --vocab-size"),
    (["--tokenizer-type", "ByteTokenizer", "--tokenizer-model", "words"],
     "--tokenizer-model is for --tokenizer-type HuggingFaceTokenizer, not ByteTokenizer"),
    (["--tokenizer-model", "words"], "--tokenizer-model is for --tokenizer-type HuggingFaceTokenizer"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "nowhere"], "nowhere is not a directory"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "words", "--vocab-file", "v.json"],
     "--vocab-file and --merge-file are for --tokenizer-type GPT2BPETokenizer"),
])
def test_refused_tokenizer_arguments(tmp_path, word_dir, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError, match=message):
        parse_job_config(_data(tmp_path) + extra, world_size=1)


def test_export_copies_the_runs_tokenizer_directory(tmp_path, word_dir):
    run = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": word_dir}
    size = len(WORDS) + 2
    (tmp_path / "out").mkdir()
    result = export_tokenizer(run, size, str(tmp_path / "out"), 64)
    assert result.files == ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "words" / "tokenizer.json").read_bytes()
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["model_max_length"]) == ("</s>", 64)  # written: the directory had none
    assert result.eod == HuggingFaceTokenizer(word_dir).eod == HuggingFaceTokenizer(str(tmp_path / "out")).eod

    # the directory's own tokenizer_config.json travels as it is
    (tmp_path / "words" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "model_max_length": 7}))
    (tmp_path / "out2").mkdir()
    result = export_tokenizer(run, size, str(tmp_path / "out2"), 64)
    assert result.files == ("tokenizer.json", "tokenizer_config.json")
    assert json.loads((tmp_path / "out2" / "tokenizer_config.json").read_text())["model_max_length"] == 7

    (tmp_path / "out3").mkdir()
    with pytest.raises(GPT2ConversionError, match=f"the tokenizer has {size} entries, the checkpoint's model 99"):
        export_tokenizer(run, 99, str(tmp_path / "out3"), 64)
    with pytest.raises(GPT2ConversionError, match=f"{tmp_path}/moved/tokenizer.json is not there"):
        export_tokenizer({**run, "tokenizer_model": str(tmp_path / "moved")}, size, str(tmp_path / "out3"), 64)
    # a directory that moved since the run is named instead
    assert export_tokenizer({**run, "tokenizer_model": str(tmp_path / "moved")}, size, str(tmp_path / "out3"), 64,
                            tokenizer_model=word_dir).eod == result.eod


def test_import_takes_tokenizer_json_when_there_are_no_gpt2_files(tmp_path, word_dir):
    size = len(WORDS) + 2
    notes = []
    (tmp_path / "ckpt").mkdir()
    args = import_tokenizer(word_dir, str(tmp_path / "ckpt"), size, notes)
    assert args == {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tmp_path / "ckpt")} and not notes
    assert build_tokenizer(**args).eod == HuggingFaceTokenizer(word_dir).eod
    assert tokenizer_flags(args, "ck") == ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "ck"]

    import_tokenizer(word_dir, str(tmp_path / "ckpt"), size + 1, notes)
    assert notes and f"has {size} entries, the model's vocabulary {size + 1}" in notes[0]

    # GPT-2's own files win: training then reads them with json alone
    write_byte_vocabulary(str(tmp_path / "words" / "vocab.json"), str(tmp_path / "words" / "merges.txt"))
    (tmp_path / "ckpt2").mkdir()
    args = import_tokenizer(word_dir, str(tmp_path / "ckpt2"), 257, notes)
    assert args["tokenizer_type"] == "GPT2BPETokenizer" and args["vocab_file"] == str(tmp_path / "ckpt2" / "vocab.json")
    assert tokenizer_flags(args, "ck")[2:] == ["--vocab-file", "ck/vocab.json", "--merge-file", "ck/merges.txt"]

    (tmp_path / "none").mkdir()
    notes = []
    assert import_tokenizer(str(tmp_path / "none"), str(tmp_path / "ckpt3"), 10, notes) == {}
    assert "no vocab.json/merges.txt or tokenizer.json" in notes[0]
