"""Every load path is correct: weights only (``--no-load-optim``), a TP change with a padded
vocabulary, a checkpoint of the format before the true-vocabulary rows, one from another device.

The reference is one TP2 run of vocabulary 128 (Megatron pads it to 256 at TP2, 128 at TP1,
512 at TP4) that trains 12 iterations straight and saves at 10.
"""

import math

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpointing.format.reader import CheckpointReader
from tests.launch import RESHARD_WORKER, ROOT, TINY, read_scalars, reshard_and_step, run_pretrain

pytestmark = pytest.mark.slow

VOCAB = 128
COMMON = TINY + ["--vocab-size", str(VOCAB), "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8",
                 "--lr", "3e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--seed", "7",
                 "--log-interval", "4", "--optimizer-shard-size-mb", "0.05"]
TP2 = ["--tensor-model-parallel-size", "2"]
FIXTURE = ROOT / "tests" / "fixtures" / "ckpt_v1_tp2_vocab100"
# The model and data of the format-1 fixture (tests/fixtures/README.md).
FIXTURE_ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size", "64",
                "--seq-length", "16", "--max-position-embeddings", "16", "--hidden-dropout", "0",
                "--attention-dropout", "0", "--vocab-size", "100", "--mock-data", "--micro-batch-size", "2",
                "--global-batch-size", "4", "--lr", "3e-3", "--seed", "7", "--train-iters", "5"]


def _straight(base, extra, nproc):
    run_pretrain(COMMON + extra + ["--train-iters", "12", "--save", str(base / "ckpt"), "--save-interval", "10",
                                   "--tensorboard-dir", str(base / "tb")], nproc=nproc)
    return base


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    return _straight(tmp_path_factory.mktemp("tp2"), TP2, nproc=2)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    return _straight(tmp_path_factory.mktemp("bf16"), ["--bf16"], nproc=1)


def _resume_without_optimizer(run, extra, nproc, tmp_path):
    proc = run_pretrain(COMMON + extra + ["--train-iters", "12", "--load", str(run / "ckpt"), "--ckpt-step", "10",
                                          "--no-load-optim", "--tensorboard-dir", str(tmp_path / "tb")], nproc=nproc)
    assert "optimizer state not loaded" in proc.stdout
    return read_scalars(run / "tb", "lm loss"), read_scalars(tmp_path / "tb", "lm loss")


@pytest.mark.parametrize("run_name, extra, nproc", [("tp2_run", TP2, 2), ("bf16_run", ["--bf16"], 1)],
                         ids=["fp32-TP2", "bf16"])
def test_no_load_optim_keeps_the_loaded_weights(request, run_name, extra, nproc, tmp_path):
    """The bug: the fp32 main weights were not set from the loaded weights, and the first step
    copied the untrained ones back over the model (iteration 12 had the untrained model's loss)."""
    straight, resumed = _resume_without_optimizer(request.getfixturevalue(run_name), extra, nproc, tmp_path)
    assert sorted(resumed) == [11, 12]
    # Iteration 11's forward sees exactly the loaded weights.
    assert resumed[11] == pytest.approx(straight[11], rel=1e-6, abs=0), (resumed, straight)
    # Iteration 12 follows one step of a fresh Adam (at the decayed learning rate of iteration
    # 11): close to the straight run, nowhere near the untrained model (about ln 128).
    assert abs(resumed[12] - straight[12]) < 0.1 * (straight[1] - straight[12]), (resumed, straight)


@pytest.mark.parametrize("nproc, layout", [(1, []), (4, ["--tensor-model-parallel-size", "4"])],
                         ids=["TP2-to-TP1", "TP2-to-TP4"])
def test_tp_change_with_a_padded_vocabulary(tp2_run, tmp_path, nproc, layout):
    """Vocabulary 128 is 256 rows at TP2, 128 at TP1, 512 at TP4: the checkpoint stores the 128
    true rows, every layout loads them, and the next loss is the straight run's."""
    full_pt = tmp_path / "full.pt"
    dcp_to_torch_save(tp2_run / "ckpt" / "iter_0000010", full_pt)
    full = torch.load(full_pt, weights_only=False)
    assert full["embedding.word_embeddings.weight"].shape == (VOCAB, 64)
    assert full["optimizer.state.exp_avg.embedding.word_embeddings.weight"].shape == (VOCAB, 64)
    reshard_and_step(full_pt, tmp_path, [*COMMON, *layout, "--train-iters", "12", "--load", str(tp2_run / "ckpt"),
                                         "--ckpt-step", "10"], nproc, read_scalars(tp2_run / "tb", "lm loss")[11], 11, 1e-4)


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path):
    """Format 1 stored the vocabulary padded for its layout (100 -> 256 rows at TP2, padded rows
    trained): a TP1 run (128 rows) takes its 100 true rows, exactly."""
    assert CheckpointReader(str(FIXTURE / "iter_0000003")).facts["format_version"] == 1
    full_pt = tmp_path / "full.pt"
    dcp_to_torch_save(FIXTURE / "iter_0000003", full_pt)
    assert torch.load(full_pt, weights_only=False)["embedding.word_embeddings.weight"].shape[0] == 256
    proc = run_pretrain([str(full_pt), str(tmp_path), *FIXTURE_ARGS, "--load", str(FIXTURE), "--override-opt_param-scheduler"],
                        nproc=1, script=RESHARD_WORKER)
    assert "loaded iteration 3" in proc.stdout
    iteration, loss = (tmp_path / "loss-0.txt").read_text().split()
    assert int(iteration) == 4 and math.isfinite(float(loss)) and float(loss) < math.log(100)


def test_a_checkpoint_from_another_device_restores_weights_and_says_rng_was_not(tmp_path):
    """A checkpoint written on a GPU (a stand-in device type in its metadata, saved on this CPU)
    loads here: weights and optimizer state exactly, and the log says the RNG states were not."""
    args = COMMON + ["--train-iters", "3", "--save", str(tmp_path / "ckpt")]
    run_pretrain(["cuda", *args], nproc=1, script=ROOT / "tests" / "workers" / "standin_device_save.py")
    common = CheckpointReader(str(tmp_path / "ckpt" / "iter_0000003")).read_object("common")
    assert common["device"] == "cuda" and common["iteration"] == 3
    full_pt = tmp_path / "full.pt"
    dcp_to_torch_save(tmp_path / "ckpt" / "iter_0000003", full_pt)
    proc = run_pretrain([str(full_pt), str(tmp_path), *COMMON, "--train-iters", "4", "--load", str(tmp_path / "ckpt"),
                         "--override-opt_param-scheduler"],
                        nproc=1, script=RESHARD_WORKER)
    assert "written on cuda, this run is on cpu" in proc.stdout
    assert "weights and optimizer state are restored exactly" in proc.stdout


def test_no_load_optim_from_host_memory_equals_from_disk(tp2_run, tmp_path):
    """The three load paths end in the same re-sync: resuming with ``--no-load-optim`` from an L0
    snapshot (shared memory, kept from the previous run) gives the losses of resuming from L2."""
    ckpt = tmp_path / "ckpt"
    engine = TP2 + ["--train-iters", "12", "--save", str(ckpt), "--async-save", "--save-interval", "5"]
    run_pretrain(COMMON + engine + ["--exit-interval", "10", "--ckpt-keep-host-pool"], nproc=2)
    from_memory = run_pretrain(COMMON + engine + ["--load", str(ckpt), "--no-load-optim",
                                                  "--tensorboard-dir", str(tmp_path / "tb-l0")], nproc=2)
    assert "loaded iteration 10 from L0" in from_memory.stdout
    run_pretrain(COMMON + TP2 + ["--train-iters", "12", "--load", str(tp2_run / "ckpt"), "--ckpt-step", "10",
                                 "--no-load-optim", "--tensorboard-dir", str(tmp_path / "tb-l2")], nproc=2)
    assert read_scalars(tmp_path / "tb-l0", "lm loss") == read_scalars(tmp_path / "tb-l2", "lm loss")
