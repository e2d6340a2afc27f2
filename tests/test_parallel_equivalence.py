"""Every parallel layout computes the same training run as one process (mock data, fp32).

Attention is the default backend, ``sdpa`` (torch's fused kernel); one TP2 layout runs megatron's
unfused ``--attention-backend local`` against the same single-process sdpa reference."""

import pytest

from tests.launch import TINY, read_scalars, run_pretrain

ITERS = 10
COMMON = TINY + [
    "--vocab-size", "1024", "--mock-data", "--seed", "7",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", str(ITERS), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2",
    "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "5",
]

LAYOUTS = {
    "TP2xPP2xDP2-distopt": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                "--use-distributed-optimizer"]),
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "TP2-local-attention": (2, ["--tensor-model-parallel-size", "2", "--attention-backend", "local"]),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "DP2": (2, []),
    "DP2-distopt": (2, ["--use-distributed-optimizer"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("single") / "tb"
    proc = run_pretrain(COMMON + ["--tensorboard-dir", str(logdir)], nproc=1)
    assert "attention sdpa," in proc.stdout, "the default attention backend is sdpa"
    losses = read_scalars(logdir, "lm loss")
    assert sorted(losses) == list(range(1, ITERS + 1))
    # The run must learn something, or equal losses would prove little.
    assert losses[ITERS] < losses[1] - 0.05, losses
    return losses, read_scalars(logdir, "grad-norm")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    reference_losses, reference_norms = reference
    nproc, extra = LAYOUTS[layout]
    logdir = tmp_path / "tb"
    proc = run_pretrain(COMMON + extra + ["--tensorboard-dir", str(logdir)], nproc=nproc)
    assert f"attention {'local' if 'local' in extra else 'sdpa'}," in proc.stdout
    losses = read_scalars(logdir, "lm loss")
    assert sorted(losses) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert losses[it] == pytest.approx(reference_losses[it], rel=1e-4), (layout, it, losses[it], reference_losses[it])
    # The global gradient norm counts every element once, whatever the layout (TP duplicates,
    # the tied embedding copy on the last stage and DP shards must not be counted twice).
    norms = read_scalars(logdir, "grad-norm")
    for it in range(1, ITERS + 1):
        assert norms[it] == pytest.approx(reference_norms[it], rel=1e-3), (layout, it, norms[it], reference_norms[it])
