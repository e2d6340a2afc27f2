"""A Llama-style model (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output)
computes the same training run in every layout as in one process, with sequence parallelism and
with activation recomputation (mock data, fp32, no dropout)."""

import pytest

from tests.launch import read_scalars, run_pretrain

pytestmark = pytest.mark.slow

ITERS = 10
COMMON = [
    "--model-size", "llama-tiny", "--seq-length", "32", "--max-position-embeddings", "32",
    "--vocab-size", "1024", "--mock-data", "--seed", "7", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", str(ITERS), "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "5",
]
TP2 = ["--tensor-model-parallel-size", "2"]
LAYOUTS = {
    "TP2xPP2xDP2-distopt-sp": (8, TP2 + ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                                       "--sequence-parallel"]),
    "TP2-sp": (2, TP2 + ["--sequence-parallel"]),
    "TP2-full-recompute": (2, TP2 + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                     "--recompute-num-layers", "1"]),
    "TP2-selective-recompute-sp": (2, TP2 + ["--recompute-granularity", "selective", "--sequence-parallel"]),
}


def _losses(tmp_path, nproc, extra):
    logdir = tmp_path / "tb"
    proc = run_pretrain(COMMON + extra + ["--tensorboard-dir", str(logdir)], nproc=nproc)
    assert "training GPT" in proc.stdout
    losses = read_scalars(logdir, "lm loss")
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    losses = _losses(tmp_path_factory.mktemp("llama-single"), 1, [])
    assert losses[ITERS] < losses[1] and len(set(losses.values())) == ITERS, losses  # it trains: not constant
    return losses


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_llama_layout_matches_single_process(layout, reference, tmp_path):
    nproc, extra = LAYOUTS[layout]
    losses = _losses(tmp_path, nproc, extra)
    for it in range(1, ITERS + 1):
        assert losses[it] == pytest.approx(reference[it], rel=1e-5), (layout, it, losses[it], reference[it])
