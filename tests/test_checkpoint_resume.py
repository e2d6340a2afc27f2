"""The checkpoint format end to end: exact resume, resharding, and the stock-PyTorch read.

One TP2xPP2xDP2 run (8 processes, distributed optimizer) trains 20 iterations and saves at 10
and 20; everything else loads its iteration-10 checkpoint.
"""

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpointing.format.reader import CheckpointReader
from tests.launch import TINY, read_scalars, reshard_and_step, run_pretrain

pytestmark = pytest.mark.slow

COMMON = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "16",
                 "--lr", "3e-3", "--lr-warmup-iters", "3", "--log-interval", "5", "--seed", "7",
                 "--optimizer-shard-size-mb", "0.05"]
TP2PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """20 iterations straight, checkpoints at 10 and 20; its losses are the reference."""
    base = tmp_path_factory.mktemp("tp2pp2dp2")
    run_pretrain(COMMON + TP2PP2 + ["--train-iters", "20", "--save", str(base / "ckpt"), "--save-interval", "10",
                                    "--tensorboard-dir", str(base / "tb")], nproc=8, timeout=600)
    return base


def test_resume_in_new_processes_replays_losses_bit_for_bit(saved_run, tmp_path):
    proc = run_pretrain(COMMON + TP2PP2 + ["--train-iters", "20", "--load", str(saved_run / "ckpt"), "--ckpt-step", "10",
                                           "--tensorboard-dir", str(tmp_path / "tb")], nproc=8, timeout=600)
    assert "loaded iteration 10" in proc.stdout
    straight = read_scalars(saved_run / "tb", "lm loss")
    resumed = read_scalars(tmp_path / "tb", "lm loss")
    assert sorted(resumed) == list(range(11, 21))
    for it in range(11, 21):
        assert resumed[it] == straight[it], f"iteration {it}: {resumed[it]!r} != {straight[it]!r}"


def test_stock_pytorch_reads_every_parameter_as_a_global_tensor(saved_run, tmp_path):
    out = tmp_path / "full.pt"
    dcp_to_torch_save(saved_run / "ckpt" / "iter_0000010", out)
    full = torch.load(out, weights_only=False)
    hidden, ffn, vocab = 64, 256, 1024
    assert full["embedding.word_embeddings.weight"].shape == (vocab, hidden)
    for layer in range(4):
        prefix = f"decoder.layers.{layer}."
        assert full[prefix + "self_attention.linear_qkv.weight"].shape == (3 * hidden, hidden)
        assert full[prefix + "mlp.linear_fc1.weight"].shape == (ffn, hidden)
        assert full[prefix + "mlp.linear_fc2.weight"].shape == (hidden, ffn)
        for kind in ("fp32_param", "exp_avg", "exp_avg_sq"):
            moment = full[f"optimizer.state.{kind}.{prefix}mlp.linear_fc2.weight"]
            assert moment.shape == (hidden, ffn) and moment.abs().sum() > 0
    # fp32 weights: the model weight is the main weight
    assert torch.equal(full["decoder.layers.2.mlp.linear_fc1.weight"],
                       full["optimizer.state.fp32_param.decoder.layers.2.mlp.linear_fc1.weight"])
    assert full["common"]["iteration"] == 10 and full["common"]["optimizer_step"] == 10
    assert set(full) >= {f"rng_state.rank_{r}" for r in range(8)}


@pytest.mark.parametrize("nproc, layout", [
    (1, []),
    (4, ["--pipeline-model-parallel-size", "2"]),
    (4, ["--tensor-model-parallel-size", "2"]),
    (4, []),
], ids=["TP1xPP1xDP1", "TP1xPP2xDP2", "TP2xPP1xDP2", "TP1xPP1xDP4"])
def test_reshard_matrix(saved_run, tmp_path, nproc, layout):
    full_pt = saved_run / "full.pt"
    if not full_pt.exists():
        dcp_to_torch_save(saved_run / "ckpt" / "iter_0000010", full_pt)
    reshard_and_step(full_pt, tmp_path, [*COMMON, *layout, "--train-iters", "20", "--load", str(saved_run / "ckpt"),
                                         "--ckpt-step", "10"], nproc, read_scalars(saved_run / "tb", "lm loss")[11], 11, 1e-4)


def test_finetune_from_tp2pp2dp2_into_tp1_with_a_new_learning_rate(saved_run, tmp_path):
    """``--finetune``: the weights of iteration 10, then a new run: iteration 1 on the data's
    first batch, a fresh optimizer, the new ``--lr`` in effect, and the run says what changed."""
    proc = run_pretrain(COMMON + ["--train-iters", "3", "--lr", "1e-3", "--load", str(saved_run / "ckpt"),
                                  "--ckpt-step", "10", "--finetune", "--save", str(tmp_path / "ckpt"),
                                  "--tensorboard-dir", str(tmp_path / "tb")], nproc=1)
    assert "loaded iteration 10" in proc.stdout and "--finetune: the weights of iteration 10" in proc.stdout
    assert "lr.lr: 0.003 -> 0.001" in proc.stdout and "parallel.tensor_parallel: 2 -> 1" in proc.stdout
    losses = read_scalars(tmp_path / "tb", "lm loss")
    assert sorted(losses) == [1, 2, 3]
    straight = read_scalars(saved_run / "tb", "lm loss")
    # The same first batch as the pretraining run's iteration 1, on trained weights.
    assert losses[1] < straight[1] - 0.1, (losses, straight)
    # The new schedule from its start: warmup 1/3 of the new peak at iteration 1.
    lr = read_scalars(tmp_path / "tb", "learning-rate")
    assert lr[1] == pytest.approx(1e-3 / 3, rel=1e-6)
    common = CheckpointReader(str(tmp_path / "ckpt" / "iter_0000003")).read_object("common")
    assert common["iteration"] == 3 and common["optimizer_step"] == 3
