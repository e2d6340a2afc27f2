"""A Llama-style model into and out of Hugging Face, end to end: llama-tiny (4 heads in 2 query
groups, RoPE, RMSNorm, SwiGLU, no biases, untied) trained at TP2 x PP2, exported as
``LlamaForCausalLM`` (transformers computes our logits within 1e-4 and generates our 20 greedy
tokens), imported back with the flags the converter prints, and loaded at TP2 with the same loss."""

import json
import shlex

import pytest

from tests.launch import our_outputs, read_scalars, run_pretrain, script, transformers_outputs

pytestmark = pytest.mark.slow

MODEL = ["--model-size", "llama-tiny", "--vocab-size", "1024"]
DATA = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--seed", "7"]
PROMPT = [5, 900, 17, 333, 42, 8, 1000, 64]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    run_pretrain(MODEL + DATA + ["--train-iters", "3", "--save", str(d / "ckpt"), "--save-interval", "3",
                                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], nproc=4)
    return d


@pytest.fixture(scope="module")
def original(run) -> dict:
    return our_outputs(run, MODEL + DATA, str(run / "ckpt"), PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def exported(run):
    proc = script("convert_checkpoint.py", "--to", "hf", str(run / "ckpt"), str(run / "hf"))
    assert "exported iteration 3" in proc.stdout and "TP2 x PP2" in proc.stdout, proc.stdout
    assert "Llama with 4 layers, hidden 64, 4 heads in 2 key/value groups" in proc.stdout, proc.stdout
    return run / "hf"


def test_transformers_llama_computes_what_we_compute(original, exported):
    from transformers import LlamaForCausalLM

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert not config["tie_word_embeddings"] and config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-5
    logits, generated = transformers_outputs(LlamaForCausalLM.from_pretrained(exported), PROMPT, NEW_TOKENS)
    assert (logits - original["logits"]).abs().max().item() <= 1e-4
    assert generated == original["generated"]


def test_imported_back_loads_at_tp2_with_the_same_loss(original, exported, tmp_path):
    """The converter's printed command line (model flags from the config, cli/flags.py) builds the
    model that loads the import."""
    proc = script("convert_checkpoint.py", "--from", "hf", str(exported), str(tmp_path / "back"))
    printed = next(line for line in proc.stdout.splitlines() if "scripts/pretrain_gpt.py" in line)
    flags = shlex.split(printed.strip().removesuffix("...").removeprefix("scripts/pretrain_gpt.py"))
    assert "--swiglu" in flags and flags[flags.index("--num-query-groups") + 1] == "2", printed
    tb = tmp_path / "tb"
    run_pretrain(flags + DATA + ["--train-iters", "1", "--tensor-model-parallel-size", "2",
                                 "--tensorboard-dir", str(tb)], nproc=2)
    assert read_scalars(tb, "lm loss")[1] == pytest.approx(original["loss"], abs=1e-5)
