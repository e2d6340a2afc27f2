"""Every refused layout or argument, checked before any process group or model exists."""

import subprocess
import sys

import pytest

from tests.launch import PRETRAIN, ROOT
from trainer.arguments import ArgumentError, parse_job_config

pytestmark = pytest.mark.slow

BASE = ["--model-size", "tiny", "--vocab-size", "1024", "--mock-data", "--train-iters", "10", "--lr", "1e-3"]


def parse(extra, world=8):
    return parse_job_config(BASE + extra, world_size=world)


def test_valid_3d_layout_is_accepted():
    job = parse(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                 "--micro-batch-size", "2", "--global-batch-size", "16"])
    assert job.parallel.data_parallel == 2
    assert job.lr.decay_iters == 10  # defaults to --train-iters
    assert job.model.ffn_hidden_size == 256


def test_finetune_is_megatrons_flag():
    cfg = parse(["--load", "ckpt", "--finetune"], world=1).checkpoint
    assert cfg.finetune and not cfg.loads_optimizer and not cfg.loads_rng


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (["--tensor-model-parallel-size", "3"], 8, "world size 8 is not divisible by tensor x pipeline"),
        (["--pipeline-model-parallel-size", "3"], 6, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (["--tensor-model-parallel-size", "0"], 8, "--tensor-model-parallel-size must be >= 1"),
        (["--tensor-model-parallel-size", "8"], 8, "--num-attention-heads 4 is not divisible"),
        (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "255"], 8, "--ffn-hidden-size 255 is not divisible"),
        (["--hidden-size", "66"], 1, "--hidden-size 66 is not divisible by --num-attention-heads 4"),
        (["--global-batch-size", "6", "--micro-batch-size", "2"], 2, "--global-batch-size 6 is not divisible"),
        (["--micro-batch-size", "0"], 1, "--micro-batch-size must be positive"),
        (["--seq-length", "128", "--max-position-embeddings", "64"], 1, "--seq-length 128 exceeds --max-position-embeddings 64"),
        (["--train-iters", "0"], 1, "--train-iters must be >= 1"),
        (["--lr", "-1"], 1, "--lr must be > 0"),
        (["--min-lr", "1"], 1, "--min-lr must be in"),
        (["--lr-warmup-iters", "20"], 1, "--lr-warmup-iters 20 exceeds --lr-decay-iters 10"),
        (["--weight-decay", "-0.1"], 1, "--weight-decay must be >= 0"),
        (["--clip-grad", "-1"], 1, "--clip-grad must be >= 0"),
        (["--adam-beta1", "1.0"], 1, "--adam-beta1 must be in"),
        (["--adam-beta2", "-0.5"], 1, "--adam-beta2 must be in"),
        (["--hidden-dropout", "1.5"], 1, "--hidden-dropout must be in"),
        (["--exit-interval", "0"], 1, "--exit-interval must be >= 1"),
        (["--log-interval", "0"], 1, "--log-interval must be >= 1"),
        (["--eval-interval", "0"], 1, "--eval-interval must be >= 1"),
        (["--transformer-impl", "transformer_engine"], 1, "--transformer-impl transformer_engine"),
        (["--data-path", "/nonexistent/corpus"], 1, "exactly one of --mock-data and --data-path"),
        (["--split", "1,2"], 1, "--split"),
        (["--optimizer-shard-size-mb", "0"], 1, "--optimizer-shard-size-mb must be > 0"),
        (["--finetune"], 1, "--finetune needs --load"),
        (["--optimizer-cpu-offload", "--bf16", "--save", "c", "--async-save"], 1,
         "--optimizer-cpu-offload with --bf16 and --async-save is not supported yet"),
    ],
)
def test_refused_with_a_clear_message(extra, world, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse(extra, world)


def test_mock_data_needs_vocab_size():
    with pytest.raises(ArgumentError, match="--mock-data needs --vocab-size"):
        parse_job_config(["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "8",
                          "--mock-data", "--train-iters", "1", "--lr", "1"], world_size=1)


@pytest.mark.parametrize("extra, vocab", [([], 1024), (["--vocab-size", "100"], 100)])
def test_mock_data_takes_the_presets_vocabulary(extra, vocab):
    job = parse_job_config(["--model-size", "llama-tiny", "--mock-data", "--train-iters", "1", "--lr", "1", *extra],
                           world_size=1)
    assert job.model.vocab_size == vocab


def test_no_data_source_is_refused():
    with pytest.raises(ArgumentError, match="exactly one of --mock-data and --data-path"):
        parse_job_config(["--model-size", "tiny", "--vocab-size", "8", "--train-iters", "1", "--lr", "1"], world_size=1)


def test_missing_data_files_are_named(tmp_path):
    prefix = tmp_path / "corpus"
    with pytest.raises(ArgumentError, match=f"{prefix}.bin does not exist"):
        parse_job_config(["--model-size", "tiny", "--data-path", str(prefix), "--train-iters", "1", "--lr", "1"], world_size=1)


def test_vocab_size_must_agree_with_tokenizer(tmp_path):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c{suffix}").write_bytes(b"")
    with pytest.raises(ArgumentError, match="disagrees with ByteTokenizer"):
        parse_job_config(["--model-size", "tiny", "--data-path", str(tmp_path / "c"), "--vocab-size", "100",
                          "--train-iters", "1", "--lr", "1"], world_size=1)


def test_model_shape_is_required_without_preset():
    with pytest.raises(ArgumentError, match="--num-layers is required"):
        parse_job_config(["--vocab-size", "8", "--mock-data", "--train-iters", "1", "--lr", "1"], world_size=1)


def test_cli_refuses_before_any_heavy_work():
    """The script prints the message and exits 2 without building a model (a few seconds)."""
    proc = subprocess.run(
        [sys.executable, str(PRETRAIN), *BASE, "--tensor-model-parallel-size", "3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={"WORLD_SIZE": "8", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "error: world size 8 is not divisible by tensor x pipeline parallel size 3 x 1" in proc.stderr
    assert "training GPT" not in proc.stdout


def test_preset_position_table_grows_with_a_longer_seq_length():
    job = parse_job_config(["--model-size", "tiny", "--seq-length", "128", "--vocab-size", "1024", "--mock-data",
                            "--train-iters", "1", "--lr", "1e-3"], world_size=1)
    assert job.model.max_position_embeddings == 128
