"""Checkpoints of a Llama-style model (llama-tiny: RoPE, RMSNorm, SwiGLU, 4 query heads in 2
groups, untied output): exact resume after a rollback, TP2 -> TP1 and TP1 -> TP2 resharding,
``--finetune``, and the global tensors of a TP2 and a TP1 run side by side.

One TP2 run with sequence parallelism trains 6 iterations with asynchronous checkpoints (L0 every
iteration, L2 at 3 and 6); its losses are the reference. One TP1 run trains 4 iterations, saving
at 3 (synchronously): the TP1 -> TP2 source and the TP1 side of the tensor comparison.
"""

import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpointing.format.reader import CheckpointReader
from tests.launch import read_scalars, reshard_and_step, rollback, run_pretrain

pytestmark = pytest.mark.slow

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, LAYERS = 4, 2, 16, 64, 176, 4  # llama-tiny
COMMON = ["--model-size", "llama-tiny", "--seq-length", "32", "--max-position-embeddings", "32",
          "--vocab-size", "1024", "--mock-data", "--seed", "7", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "3e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--log-interval", "3",
          "--optimizer-shard-size-mb", "0.05"]
"""``--lr-decay-iters`` given: runs of 4 and 6 iterations follow one schedule."""
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
ASYNC = ["--async-save", "--save-interval", "1", "--ckpt-persistent-interval", "3"]
HOLD = {"GPT_CKPT_HOLD": "request"}
"""Every due version reaches its level however loaded the machine (else one superseded before its
flush started is skipped, by design): the L2 checkpoint of iteration 3 is always written."""


def _full(ckpt_dir, step):
    """The checkpoint of ``step`` as stock PyTorch reads it (converted once per directory)."""
    out = ckpt_dir.parent / f"full-{ckpt_dir.name}-{step}.pt"
    if not out.exists():
        dcp_to_torch_save(ckpt_dir / f"iter_{step:07d}", out)
    return out


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """6 iterations straight at TP2 with sequence parallelism, asynchronous checkpoints."""
    base = tmp_path_factory.mktemp("llama-tp2")
    proc = run_pretrain(COMMON + TP2 + ASYNC + ["--train-iters", "6", "--save", str(base / "ckpt"),
                                                "--tensorboard-dir", str(base / "tb")], nproc=2, env=HOLD)
    # The engine's record: every iteration in L0 through zero-copy steps behind the fences, 3 and 6 in L2.
    assert " 6 snapshots (L0, zero-copy" in proc.stdout and "  L2: 2 checkpoints" in proc.stdout, proc.stdout[-1500:]
    return base


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory):
    """4 iterations straight in one process, a synchronous checkpoint at 3."""
    base = tmp_path_factory.mktemp("llama-tp1")
    run_pretrain(COMMON + ["--train-iters", "4", "--save", str(base / "ckpt"), "--save-interval", "3",
                           "--tensorboard-dir", str(base / "tb")], nproc=1)
    return base


def test_resume_after_a_rollback_replays_the_losses_bit_for_bit(tp2_run, tmp_path):
    """New processes resume from the asynchronous engine's L2 checkpoint of iteration 3 (the
    newest one after ``rollback.sh 3``) and train exactly what the uninterrupted run trained."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tp2_run / "ckpt", ckpt)
    assert "L2: tracker 6 -> 3" in rollback(3, "--save", ckpt).stdout
    proc = run_pretrain(COMMON + TP2 + ASYNC + ["--train-iters", "6", "--save", str(ckpt), "--load", str(ckpt),
                                                "--tensorboard-dir", str(tmp_path / "tb")], nproc=2, env=HOLD)
    assert "loaded iteration 3" in proc.stdout
    straight, resumed = read_scalars(tp2_run / "tb", "lm loss"), read_scalars(tmp_path / "tb", "lm loss")
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == straight[it], f"iteration {it}: {resumed[it]!r} != {straight[it]!r}"


@pytest.mark.parametrize("source, target", [("tp2_run", []), ("tp1_run", TP2)], ids=["TP2-to-TP1", "TP1-to-TP2"])
def test_reshard(request, source, target, tmp_path):
    """Every loaded piece is its rectangle of the stock-PyTorch global tensors, bit for bit (the
    worker checks), with and without the distributed optimizer; the next loss is the source's."""
    run = request.getfixturevalue(source)
    reshard_and_step(_full(run / "ckpt", 3), tmp_path, [*COMMON, *target, "--train-iters", "4", "--load", str(run / "ckpt"),
                                                       "--ckpt-step", "3"], 2 if target else 1,
                     read_scalars(run / "tb", "lm loss")[4], 4, 1e-5)


def _qkv_rows(weight):
    """A ``linear_qkv.weight`` as ``[group][q heads of the group, k, v][head_dim]`` rows."""
    return weight.view(GROUPS, HEADS // GROUPS + 2, HEAD_DIM, HIDDEN)


def _distance(a, b) -> float:
    """How far ``a`` is from ``b``, relative to ``b``'s size (Frobenius norms)."""
    return ((a - b).norm() / b.norm()).item()


def test_tp2_and_tp1_save_the_same_global_tensors(tp2_run, tp1_run):
    """Both layouts' checkpoints of iteration 3 hold the same global tensors (the two runs train
    the same function, to rounding: within 3e-5 here, what Adam makes of the rounding of the
    TP2 sums): the same names and shapes, SwiGLU's fc1 as (2, ffn, hidden), GQA's QKV in rows of
    whole query groups, the sequence-parallel norms once."""
    tp2 = torch.load(_full(tp2_run / "ckpt", 3), weights_only=False)
    tp1 = torch.load(_full(tp1_run / "ckpt", 3), weights_only=False)
    tensors = sorted(k for k, v in tp1.items() if isinstance(v, torch.Tensor) and not k.startswith("rng_state"))
    assert tensors == sorted(k for k, v in tp2.items() if isinstance(v, torch.Tensor) and not k.startswith("rng_state"))
    prefix = "decoder.layers.0."
    assert tp2[prefix + "self_attention.linear_qkv.weight"].shape == ((HEADS + 2 * GROUPS) * HEAD_DIM, HIDDEN)
    assert tp2[prefix + "mlp.linear_fc1.weight"].shape == (2, FFN, HIDDEN)
    assert tp2[prefix + "mlp.linear_fc2.weight"].shape == (HIDDEN, FFN)
    for norm in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"):
        assert tp2[prefix + norm].shape == (HIDDEN,)
    assert tp2["output_layer.weight"].shape == (1024, HIDDEN)
    for key in tensors:
        assert tp2[key].shape == tp1[key].shape, key
        assert _distance(tp2[key], tp1[key]) < 1e-3, (key, _distance(tp2[key], tp1[key]))
    # The QKV rows mean the same in both: the TP2 checkpoint read in another row order (the ranks'
    # groups swapped, or q, k and v apart) is as far from the TP1 one as unrelated weights.
    for layer in range(LAYERS):
        key = f"decoder.layers.{layer}.self_attention.linear_qkv.weight"
        for name in (key, f"optimizer.state.exp_avg.{key}"):
            saved, single = _qkv_rows(tp2[name]), _qkv_rows(tp1[name])
            for wrong in (saved.flip(0), saved.flip(1)):
                assert _distance(wrong, single) > 0.5, name


def test_finetune_from_tp2_into_tp1_with_a_new_learning_rate(tp2_run, tmp_path):
    """``--finetune``: the TP2 run's weights of iteration 6 in one process, then a new run from
    iteration 1 (the data's first batch, a fresh optimizer, the new ``--lr``)."""
    proc = run_pretrain(COMMON + ["--train-iters", "2", "--lr", "1e-3", "--load", str(tp2_run / "ckpt"), "--finetune",
                                  "--save", str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb")], nproc=1)
    assert "loaded iteration 6" in proc.stdout and "--finetune: the weights of iteration 6" in proc.stdout
    assert "lr.lr: 0.003 -> 0.001" in proc.stdout and "parallel.tensor_parallel: 2 -> 1" in proc.stdout
    assert "parallel.sequence_parallel: True -> False" in proc.stdout
    losses, straight = read_scalars(tmp_path / "tb", "lm loss"), read_scalars(tp2_run / "tb", "lm loss")
    assert sorted(losses) == [1, 2]
    assert losses[1] < straight[1] - 0.05, (losses, straight)  # the first batch again, on trained weights
    assert read_scalars(tmp_path / "tb", "learning-rate")[1] == pytest.approx(1e-3, rel=1e-6)
    common = CheckpointReader(str(tmp_path / "ckpt" / "iter_0000002")).read_object("common")
    assert common["iteration"] == 2 and common["optimizer_step"] == 2
