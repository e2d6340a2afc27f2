"""Into and out of the ecosystem, end to end: a tiny GPT trained at TP2 x PP2 on text tokenized
with a BPE trained on it, exported to Hugging Face (``transformers`` computes the same logits
and generates the same tokens, its tokenizer encodes the same ids), imported back (the same
loss in another layout), and the run's checkpoint history; an untied model trained with
ByteTokenizer exports as well."""

import json
import math
import random

import pytest
import torch

from tests.launch import our_outputs, read_scalars, run_pretrain, script, transformers_outputs

pytestmark = pytest.mark.slow

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
         "--seq-length", "32", "--max-position-embeddings", "32", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--seed", "7"]
WORDS = "the king queen lord lady speak shall thou thee thy good night sweet prince love death".split()
PROMPT = "the sweet prince shall"
NEW_TOKENS = 20


def corpus(d) -> str:
    rng = random.Random(0)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(400)))
    return str(d / "corpus.txt")


def export(d):
    return script("convert_checkpoint.py", "--to", "hf", str(d / "ckpt"), str(d / "hf"))


def check_transformers_agrees(hf_dir, ours: dict, prompt: str = PROMPT) -> None:
    """transformers' GPT-2 from ``hf_dir``: its tokenizer encodes ``prompt`` to our ids, its logits
    are ours within 1e-5 and its greedy generation of 20 tokens is ours."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ids = ours["ids"]
    assert AutoTokenizer.from_pretrained(hf_dir)(prompt)["input_ids"] == ids
    logits, generated = transformers_outputs(GPT2LMHeadModel.from_pretrained(hf_dir), ids, NEW_TOKENS)
    assert (logits - ours["logits"]).abs().max().item() <= 1e-5
    assert generated == ours["generated"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A corpus, a BPE of 320 entries trained on it, and 4 iterations at TP2 x PP2 (checkpoints
    at iterations 2 and 4)."""
    d = tmp_path_factory.mktemp("interop")
    prepared = script("prepare_data.py", "--input", corpus(d), "--output-prefix", str(d / "data"),
                      "--tokenizer-type", "GPT2BPETokenizer", "--train-tokenizer", "--vocab-size", "320")
    assert "tokens per byte" in prepared.stdout
    data = ["--data-path", str(d / "data"), "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(d / "data-vocab.json"), "--merge-file", str(d / "data-merges.txt")]
    run_pretrain(MODEL + data + ["--train-iters", "4", "--save", str(d / "ckpt"), "--save-interval", "2",
                                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], nproc=4)
    return d, data


@pytest.fixture(scope="module")
def original(run) -> dict:
    from tokenization.tokenizer import GPT2BPETokenizer

    d, data = run
    ids = GPT2BPETokenizer(str(d / "data-vocab.json"), str(d / "data-merges.txt")).tokenize(PROMPT)
    return our_outputs(d, MODEL + data, str(d / "ckpt"), ids)


@pytest.fixture(scope="module")
def exported(run):
    d, _ = run
    proc = export(d)
    assert "exported iteration 4" in proc.stdout and "TP2 x PP2" in proc.stdout, proc.stdout
    return d / "hf"


def test_transformers_computes_what_we_compute(original, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["vocab_size"] == 320 and config["tie_word_embeddings"]
    check_transformers_agrees(exported, original)


def test_untied_byte_tokenizer_run_exports_too(tmp_path):
    """One process, --untie-embeddings-and-output-weights, ByteTokenizer: the export's tokenizer
    files make transformers' GPT-2 tokenizer encode bytes as ByteTokenizer does."""
    from tokenization.tokenizer import ByteTokenizer

    script("prepare_data.py", "--input", corpus(tmp_path), "--output-prefix", str(tmp_path / "data"))
    flags = MODEL + ["--data-path", str(tmp_path / "data"), "--tokenizer-type", "ByteTokenizer",
                     "--untie-embeddings-and-output-weights"]
    run_pretrain(flags + ["--train-iters", "2", "--save", str(tmp_path / "ckpt")])
    assert "untied output layer" in export(tmp_path).stdout
    assert not json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
    prompt = "the king"  # 8 bytes and 20 more fit the 32 positions
    ours = our_outputs(tmp_path, flags, str(tmp_path / "ckpt"), ByteTokenizer().tokenize(prompt))
    check_transformers_agrees(tmp_path / "hf", ours, prompt)


def test_imported_back_loads_with_the_same_loss_in_another_layout(run, original, exported, tmp_path):
    _, data = run
    proc = script("convert_checkpoint.py", "--from", "hf", str(exported), str(tmp_path / "back"))
    assert "--tokenizer-type GPT2BPETokenizer" in proc.stdout and "--load" in proc.stdout, proc.stdout
    tb = tmp_path / "tb"
    # A plain --load takes a weights-only checkpoint (the optimizer starts afresh); --finetune too.
    loaded = run_pretrain(MODEL + data + ["--train-iters", "1", "--load", str(tmp_path / "back"),
                                          "--tensor-model-parallel-size", "2", "--tensorboard-dir", str(tb)], nproc=2)
    assert "holds weights only: the optimizer starts afresh" in loaded.stdout, loaded.stdout[-2000:]
    assert read_scalars(tb, "lm loss")[1] == pytest.approx(original["loss"], abs=1e-5)


def test_history_of_the_run(run, tmp_path):
    """Norms against the stock reader's full tensors (dcp_to_torch_save), and TensorBoard."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    d, _ = run
    tb = tmp_path / "tb"
    proc = script("ckpt_history.py", str(d / "ckpt"), "--tensorboard-dir", str(tb))
    full = {}
    for it in (2, 4):
        dcp_to_torch_save(str(d / "ckpt" / f"iter_{it:07d}"), str(tmp_path / f"{it}.pt"))
        full[it] = torch.load(tmp_path / f"{it}.pt", weights_only=False)
    weights = {it: {k: v.double() for k, v in f.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}
               for it, f in full.items()}
    norm = {it: math.sqrt(sum(float(v.square().sum()) for v in w.values())) for it, w in weights.items()}
    update = math.sqrt(sum(float((weights[4][k] - weights[2][k]).square().sum()) for k in weights[4]))
    v = [t.double() for k, t in full[4].items() if k.startswith("optimizer.state.exp_avg_sq.")]
    v_mean = float(sum(t.sum() for t in v) / sum(t.numel() for t in v))

    assert read_scalars(tb, "history/weight-norm") == pytest.approx(norm, rel=1e-6)
    assert read_scalars(tb, "history/update-norm")[4] == pytest.approx(update, rel=1e-5)
    assert read_scalars(tb, "history/adam-v-mean")[4] == pytest.approx(v_mean, rel=1e-5)
    layer3 = [k for k in weights[4] if k.startswith("decoder.layers.3.")]
    relative = math.sqrt(sum(float((weights[4][k] - weights[2][k]).square().sum()) for k in layer3)
                         / sum(float(weights[2][k].square().sum()) for k in layer3))
    assert read_scalars(tb, "history/relative-change/decoder.layers.3")[4] == pytest.approx(relative, rel=1e-5)
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["iteration", "weight", "norm"]
    row4 = lines[3].split()
    assert row4[0] == "4" and float(row4[1]) == pytest.approx(norm[4], rel=1e-5)
