"""Every parallel layout computes the same training run as one process (mock data, fp32).

Attention is the default backend, ``sdpa`` (torch's fused kernel); one TP2 layout runs megatron's
unfused ``--attention-backend local`` against the same single-process sdpa reference.

Vocabulary 1024 is not padded at TP <= 8 (a multiple of 128 x TP); vocabulary 128 is padded to
128 x TP, to 512 at TP4, where three of the four ranks hold nothing but padding: the padded
entries (masked logits, zero rows) must not change the function."""

import pytest

from tests.launch import TINY, read_scalars, run_pretrain

pytestmark = pytest.mark.slow

ITERS = 10


def common_args(vocab_size: int) -> list[str]:
    """The run every layout repeats, with a mock-data vocabulary of ``vocab_size``."""
    return TINY + [
        "--vocab-size", str(vocab_size), "--mock-data", "--seed", "7",
        "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", str(ITERS), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2",
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "5",
    ]


COMMON = common_args(1024)

LAYOUTS = {
    "TP2xPP2xDP2-distopt": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                "--use-distributed-optimizer"]),
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "TP2-local-attention": (2, ["--tensor-model-parallel-size", "2", "--attention-backend", "local"]),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"]),
    "DP2": (2, []),
    "DP2-distopt": (2, ["--use-distributed-optimizer"]),
}


# The same run with vocabulary 128, and the layouts that pad it (to 256 and 512).
PADDED_VOCAB_COMMON = common_args(128)
PADDED_VOCAB_LAYOUTS = {
    "TP2-vocab128": (2, ["--tensor-model-parallel-size", "2"]),
    "TP4-vocab128": (4, ["--tensor-model-parallel-size", "4"]),
}


def _single_process_run(logdir, common):
    proc = run_pretrain(common + ["--tensorboard-dir", str(logdir)], nproc=1)
    assert "attention sdpa," in proc.stdout, "the default attention backend is sdpa"
    losses = read_scalars(logdir, "lm loss")
    assert sorted(losses) == list(range(1, ITERS + 1))
    # The run must learn something, or equal losses would prove little.
    assert losses[ITERS] < losses[1] - 0.05, losses
    return losses, read_scalars(logdir, "grad-norm")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _single_process_run(tmp_path_factory.mktemp("single") / "tb", COMMON)


@pytest.fixture(scope="module")
def padded_vocab_reference(tmp_path_factory):
    return _single_process_run(tmp_path_factory.mktemp("single-vocab128") / "tb", PADDED_VOCAB_COMMON)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    _check_layout(layout, COMMON, LAYOUTS[layout], reference, tmp_path)


@pytest.mark.parametrize("layout", sorted(PADDED_VOCAB_LAYOUTS))
def test_padded_vocabulary_layout_matches_single_process(layout, padded_vocab_reference, tmp_path):
    _check_layout(layout, PADDED_VOCAB_COMMON, PADDED_VOCAB_LAYOUTS[layout], padded_vocab_reference, tmp_path)


def _check_layout(layout, common, nproc_and_extra, reference, tmp_path):
    reference_losses, reference_norms = reference
    nproc, extra = nproc_and_extra
    logdir = tmp_path / "tb"
    proc = run_pretrain(common + extra + ["--tensorboard-dir", str(logdir)], nproc=nproc)
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
