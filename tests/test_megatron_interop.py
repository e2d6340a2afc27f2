"""Megatron-LM's torch_dist checkpoints, both ways, against megatron-core itself: its own
``GPTModel`` (GPT-2-style, and Llama-style with RoPE, RMSNorm, SwiGLU, GQA and an untied output)
saved by its own ``dist_checkpointing`` at TP1 and TP2 is converted (``convert_checkpoint.py
--from megatron``) bit for bit, our trainer loads it in other layouts and computes megatron-core's
logits; ours converted back (``--to megatron``) is loaded by megatron-core's
``dist_checkpointing.load`` bit for bit; a checkpoint of another shape, a planted ``common.pt``
and a truncated data file are refused by name, with nothing written.
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import job_env
from tests.launch import ROOT, our_outputs, run_pretrain, script
from tests.workers.megatron_fixture_worker import ITERATION, PROMPT, SHAPES

pytestmark = pytest.mark.slow

WORKER = ROOT / "tests" / "workers" / "megatron_fixture_worker.py"
RESHARD_WORKER = ROOT / "tests" / "workers" / "reshard_worker.py"
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def megatron(*args: str, nproc: int = 1) -> None:
    """Run the megatron-core worker (one process, or ``nproc`` ranks as torchrun would start them)."""
    megatron_side_by_side([(args, nproc)])


def megatron_side_by_side(runs: list[tuple[tuple[str, ...], int]]) -> None:
    """Run the megatron-core worker once per (args, nproc), all at once, each forked from the
    tests' zygote (``tests/launch.run_pretrain``: megatron-core imported once, not per rank).
    Fails naming the first run that failed; none outlives the call (a timeout kills a launch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(runs)) as pool:
        done = [pool.submit(run_pretrain, list(args), nproc=nproc, timeout=300, check=False, script=WORKER)
                for args, nproc in runs]
        for (args, _), future in zip(runs, done):
            proc = future.result()
            assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def true_rows(params: dict[str, torch.Tensor], vocab: int = 100) -> dict[str, torch.Tensor]:
    return {k: (v[:vocab] if k in VOCAB_TENSORS else v) for k, v in params.items()}


def model_flags(kind: str) -> list[str]:
    s = SHAPES[kind]
    flags = ["--num-layers", s["num_layers"], "--hidden-size", s["hidden_size"], "--num-attention-heads",
             s["num_attention_heads"], "--ffn-hidden-size", s["ffn_hidden_size"], "--seq-length", s["seq_length"],
             "--max-position-embeddings", s["max_position_embeddings"], "--vocab-size", s["vocab_size"],
             "--hidden-dropout", "0", "--attention-dropout", "0"]
    if kind == "llama":
        flags += ["--position-embedding-type", "rope", "--rotary-base", s["rotary_base"], "--normalization", "RMSNorm",
                  "--swiglu", "--group-query-attention", "--num-query-groups", s["num_query_groups"],
                  "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
    return [str(f) for f in flags]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """megatron-core's checkpoints: GPT at TP1 and TP2, Llama at TP1 (each beside its parameters)."""
    root = tmp_path_factory.mktemp("megatron")
    megatron_side_by_side([(("save", kind, str(root / name)), nproc)
                           for name, kind, nproc in (("gpt-tp1", "gpt", 1), ("gpt-tp2", "gpt", 2), ("llama-tp1", "llama", 1))])
    return root


@pytest.fixture(scope="module")
def converted(saved):
    """Each converted by the command line (``--from megatron``)."""
    for name in ("gpt-tp1", "gpt-tp2", "llama-tp1"):
        proc = script("convert_checkpoint.py", "--from", "megatron", str(saved / name / "ckpt"), str(saved / name / "ours"))
        assert f"imported {saved / name / 'ckpt' / f'iter_{ITERATION:07d}'}" in proc.stdout, proc.stdout
        assert "--finetune" in proc.stdout and f"iteration {ITERATION} is recorded" in proc.stdout, proc.stdout
    return saved


@pytest.mark.parametrize("name", ["gpt-tp1", "gpt-tp2", "llama-tp1"])
def test_every_weight_is_megatron_cores_bit_for_bit(converted, name):
    from interop.checkpoint_tensors import CheckpointTensors

    ours = CheckpointTensors(str(converted / name / "ours" / "iter_0000000"))
    expected = true_rows(torch.load(converted / name / "params.pt"))
    assert sorted(ours.model_keys()) == sorted(expected)
    assert ours.model_args["vocab_size"] == 100 and ours.common["imported_iteration"] == ITERATION
    for key in ours.model_keys():
        assert torch.equal(ours.read(key), expected[key]), key


@pytest.mark.parametrize("kind, layouts", [
    ("gpt", [(1, 1, 1), (2, 1, 2), (2, 2, 4)]),  # (TP, PP, processes)
    ("llama", [(1, 1, 1), (2, 2, 4)]),
])
def test_our_trainer_loads_it_in_any_layout_with_megatron_cores_logits(converted, kind, layouts, tmp_path):
    """Every loaded rectangle equals megatron-core's tensor in each layout (tests/workers/reshard_worker.py,
    with and without the distributed optimizer), the first step's loss is the same in all of them,
    and the logits of a prompt are megatron-core's within 1e-5."""
    name = f"{kind}-tp1"
    load = str(converted / name / "ours")
    full = tmp_path / "full.pt"
    torch.save(true_rows(torch.load(converted / name / "params.pt")), full)
    losses = []
    for tp, pp, nproc in layouts:
        out = tmp_path / f"tp{tp}pp{pp}"
        out.mkdir()
        args = model_flags(kind) + ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr",
                                    "1e-3", "--train-iters", "1", "--load", load, "--finetune",
                                    "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        run_pretrain([str(full), str(out), *args], nproc=nproc, timeout=600, script=RESHARD_WORKER)
        losses += [float((out / f"loss-{d}.txt").read_text().split()[1]) for d in (0, 1)]
    assert all(math.isclose(loss, losses[0], rel_tol=1e-5) for loss in losses), losses
    ours = our_outputs(tmp_path, model_flags(kind) + ["--mock-data", "--micro-batch-size", "1", "--global-batch-size",
                                                      "1", "--lr", "1e-3"], load, PROMPT, new_tokens=0)
    theirs = torch.load(converted / name / "logits.pt")
    assert ours["logits"].shape == theirs.shape
    torch.testing.assert_close(ours["logits"], theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, nproc", [("gpt", 1), ("llama", 2)])
def test_ours_to_megatron_loads_in_megatron_core_bit_for_bit(converted, kind, nproc, tmp_path):
    """Ours (the converted checkpoint) -> --to megatron -> megatron-core's dist_checkpointing.load
    into a fresh GPTModel (TP1, or TP2 for Llama): every parameter equals ours."""
    from interop.checkpoint_tensors import CheckpointTensors

    source = converted / f"{kind}-tp1" / "ours"
    proc = script("convert_checkpoint.py", "--to", "megatron", str(source), str(tmp_path / "megatron"))
    assert "padded to 128" in proc.stdout, proc.stdout
    assert (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").read_text() == "0"
    common = torch.load(tmp_path / "megatron" / "iter_0000000" / "common.pt", weights_only=False)
    assert isinstance(common["args"], argparse.Namespace) and common["args"].num_layers == 2
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    megatron("load", kind, str(tmp_path / "megatron" / "iter_0000000"), str(tmp_path / "loaded.pt"), nproc=nproc)
    loaded = true_rows(torch.load(tmp_path / "loaded.pt"))
    ours = CheckpointTensors(str(source / "iter_0000000"))
    assert sorted(loaded) == sorted(ours.model_keys())
    for key in ours.model_keys():
        assert torch.equal(loaded[key], ours.read(key)), key


def _copy(saved, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(saved / "gpt-tp1" / "ckpt", copy)
    return copy


def test_a_model_of_another_shape_is_refused_naming_the_flag(converted, tmp_path):
    load = str(converted / "gpt-tp1" / "ours")
    args = [a if a != "64" else "128" for a in model_flags("gpt")]  # --hidden-size 128
    proc = run_pretrain(args + ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-3",
                                "--train-iters", "1", "--load", load, "--finetune"], check=False)
    assert proc.returncode != 0 and "--hidden-size: 64 saved, 128 now" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    # The converter checks the args against the tensors the same way.
    ckpt = _copy(converted, tmp_path)
    common_path = ckpt / f"iter_{ITERATION:07d}" / "common.pt"
    common = torch.load(common_path, weights_only=False)
    common["args"].hidden_size = 128
    torch.save(common, common_path)
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--from", "megatron",
                              str(ckpt), str(tmp_path / "out")], capture_output=True, text=True, env=job_env())
    assert refused.returncode == 2 and "--hidden-size: 128 in the args or flags, 64 in the tensors" in refused.stderr
    assert not (tmp_path / "out").exists()
    # Plain --load of a Megatron checkpoint says what to do, rather than call its files damaged.
    proc = run_pretrain(model_flags("gpt") + ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
                                              "--lr", "1e-3", "--train-iters", "1", "--load", str(ckpt)], check=False)
    assert "is a Megatron-LM torch_dist checkpoint; convert it first" in proc.stderr, proc.stderr[-2000:]


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-ran",))


def test_a_planted_common_pt_is_refused_and_nothing_runs(converted, tmp_path):
    ckpt = _copy(converted, tmp_path)
    common_path = ckpt / f"iter_{ITERATION:07d}" / "common.pt"
    common = torch.load(common_path, weights_only=False)
    common["extra"] = _Planted()
    torch.save(common, common_path)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--from", "megatron",
                           str(ckpt), str(tmp_path / "out")], capture_output=True, text=True, env=job_env(),
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{common_path} needs full unpickling" in proc.stderr and "--trust-checkpoint-pickles" in proc.stderr
    assert not (tmp_path / "planted-ran").exists() and not (tmp_path / "out").exists()


def test_a_truncated_data_file_is_refused_naming_it(converted, tmp_path):
    ckpt = _copy(converted, tmp_path)
    data = sorted((ckpt / f"iter_{ITERATION:07d}").glob("*.distcp"))[-1]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--from", "megatron",
                           str(ckpt), str(tmp_path / "out")], capture_output=True, text=True, env=job_env())
    assert proc.returncode == 2 and f"{data} is truncated" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
