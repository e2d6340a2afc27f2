"""``--attention-backend sdpa``: the same function as megatron's DotProductAttention, in the
module and through the trainer, and the refused settings and flags."""

import pytest
import torch

from tests.launch import read_scalars, run_pretrain
from trainer.arguments import ArgumentError, parse_job_config

pytestmark = pytest.mark.slow

S, B, HEADS, HEAD_DIM = 32, 2, 4, 16  # the tiny model: hidden 64 = 4 heads x 16


@pytest.fixture(scope="module")
def megatron_state(single_process_group):
    """A 1-rank megatron-core (TP1, PP1) and its RNG tracker, on the device a run would pick."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from models.cpu_compat import apply_cpu_compat
    from trainer.device import select_device

    device = select_device().device
    apply_cpu_compat(device)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield device
    parallel_state.destroy_model_parallel()


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = dict(num_layers=2, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                  attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
    values.update(overrides)
    return TransformerConfig(**values)


def _pair(config, layer_number=1, softmax_scale=None):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from models.sdpa_attention import SDPAttention

    args = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                attention_type="self", softmax_scale=softmax_scale)
    return DotProductAttention(**args), SDPAttention(**args)


def _qkv(device, groups=HEADS, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(S, B, groups, HEAD_DIM, generator=g) for _ in range(2))
    return [t.to(device).requires_grad_() for t in (q, k, v)]


def _causal_mask(device):
    return torch.triu(torch.ones(S, S, dtype=torch.bool, device=device), 1)[None, None]


def _output_and_grads(module, q, k, v, mask, out_grad):
    out = module(q, k, v, mask)
    return (out, *torch.autograd.grad(out, (q, k, v), out_grad))


@pytest.mark.parametrize(
    "case",
    ["causal-mask", "no-mask", "grouped-query", "layer-scaling", "explicit-scale"],
)
def test_sdpa_matches_dot_product_attention(megatron_state, case):
    device = megatron_state
    config = _config(
        num_query_groups=2 if case == "grouped-query" else None,
        apply_query_key_layer_scaling=case == "layer-scaling",
    )
    # layer 3: with apply_query_key_layer_scaling megatron divides the scores by 3 and multiplies
    # them back in the softmax; the function must not change.
    ref, sdpa = _pair(config, layer_number=3, softmax_scale=0.3 if case == "explicit-scale" else None)
    q, k, v = _qkv(device, groups=2 if case == "grouped-query" else HEADS)
    mask = _causal_mask(device)
    out_grad = torch.randn(S, B, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(device)
    # megatron builds the causal mask itself when given None, but with a "cuda" device literal
    # (transformer/utils.py): it always gets the mask here.
    expected = _output_and_grads(ref, q, k, v, mask, out_grad)
    got = _output_and_grads(sdpa, q, k, v, None if case == "no-mask" else mask, out_grad)
    assert got[0].shape == (S, B, HEADS * HEAD_DIM)
    for name, a, b in zip(("output", "dq", "dk", "dv"), expected, got):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (case, name, (a - b).abs().max().item())


def test_dropout_draws_from_the_tensor_parallel_tracker(megatron_state):
    """As DotProductAttention: dropout inside ``get_cuda_rng_tracker().fork()`` (per-TP-rank
    stream), the default generator untouched; none in eval mode."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from trainer.device import DeviceContext

    device = megatron_state
    ctx = DeviceContext(device=device, backend="")
    _, sdpa = _pair(_config(attention_dropout=0.5))
    _, no_dropout = _pair(_config(attention_dropout=0.0))
    q, k, v = _qkv(device)
    mask = _causal_mask(device)

    def default_generator_state():
        return torch.get_rng_state() if device.type == "cpu" else ctx.get_rng_state()

    model_parallel_cuda_manual_seed(77)
    sdpa.train()
    before = default_generator_state()
    tracker_before = get_cuda_rng_tracker().get_states()
    first = sdpa(q, k, v, mask)
    assert torch.equal(default_generator_state(), before), "dropout must not draw from the default generator"
    tracker_after = get_cuda_rng_tracker().get_states()
    assert any(not torch.equal(tracker_before[n], tracker_after[n]) for n in tracker_before), "the tracker's stream must advance"
    assert not torch.allclose(first, no_dropout(q, k, v, mask)), "dropout 0.5 must change the output"
    model_parallel_cuda_manual_seed(77)
    assert torch.equal(first, sdpa(q, k, v, mask)), "the same tracker seed must give the same dropout"
    sdpa.eval()
    assert torch.allclose(sdpa(q, k, v, mask), no_dropout(q, k, v, mask), atol=1e-6), "no dropout in eval mode"


def test_what_sdpa_does_not_support_is_refused(megatron_state):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from models.sdpa_attention import SDPAttention, SDPAttentionUnsupported

    device = megatron_state
    _, sdpa = _pair(_config())
    q, k, v = _qkv(device)
    padding = _causal_mask(device).clone()
    padding[..., -1] = True  # the last key masked for every query: a padding mask
    with pytest.raises(SDPAttentionUnsupported, match="not the causal mask"):
        sdpa(q, k, v, padding)
    with pytest.raises(SDPAttentionUnsupported, match="dtype"):
        sdpa(q, k, v, _causal_mask(device).float())
    with pytest.raises(SDPAttentionUnsupported, match="attention_bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1, HEADS, S, S, device=device))
    with pytest.raises(SDPAttentionUnsupported, match="packed sequences"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams())
    with pytest.raises(SDPAttentionUnsupported, match="only causal"):
        sdpa(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(SDPAttentionUnsupported, match="as many queries as keys"):
        sdpa(q[:1], k, v, None)
    build = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    with pytest.raises(SDPAttentionUnsupported, match="attn_mask_type"):
        SDPAttention(_config(), **{**build, "attn_mask_type": AttnMaskType.padding})
    with pytest.raises(SDPAttentionUnsupported, match="softmax_type"):
        SDPAttention(_config(softmax_type="off-by-one"), **build)
    with pytest.raises(SDPAttentionUnsupported, match="window_size"):
        SDPAttention(_config(window_size=(8, 0)), **build)


def test_sdpa_spec_is_the_local_spec_with_only_core_attention_replaced():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from models.gpt import layer_spec
    from models.norms import with_torch_norms
    from models.sdpa_attention import SDPAttention

    # Both have the torch norms that allow sequence parallelism in place of megatron's.
    local, sdpa = with_torch_norms(get_gpt_layer_local_spec()), layer_spec("local", "sdpa")
    attention = sdpa.submodules.self_attention.submodules
    assert attention.core_attention is SDPAttention
    attention.core_attention = DotProductAttention
    assert sdpa == local, "everything but core_attention must stay megatron's local spec"
    assert layer_spec("local").submodules.self_attention.submodules.core_attention is SDPAttention  # the default
    assert layer_spec("local", "local") == local
    assert get_gpt_layer_local_spec().submodules.self_attention.submodules.core_attention is DotProductAttention


# --- through the trainer ---------------------------------------------------------------------

ITERS = 5
# --init-method-std 0.2, not 0.02: with Megatron's small init the attention is nearly uniform and
# a 1% error of the softmax scale moves the loss by less than 1e-6; here it moves it by 2e-4.
TINY_2_LAYERS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
    "--seq-length", "32", "--max-position-embeddings", "32", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--vocab-size", "1024", "--mock-data", "--seed", "7", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--train-iters", str(ITERS), "--lr", "3e-3", "--log-interval", "5", "--init-method-std", "0.2",
]


def test_training_losses_equal_with_local_and_sdpa_attention(tmp_path):
    runs = {}
    for backend in ("local", "sdpa"):
        logdir = tmp_path / backend
        proc = run_pretrain(TINY_2_LAYERS + ["--attention-backend", backend, "--tensorboard-dir", str(logdir)])
        assert f"attention {backend}," in proc.stdout, proc.stdout[-2000:]
        runs[backend] = read_scalars(logdir, "lm loss"), read_scalars(logdir, "grad-norm")
    (local_losses, local_norms), (sdpa_losses, sdpa_norms) = runs["local"], runs["sdpa"]
    assert sorted(sdpa_losses) == list(range(1, ITERS + 1))
    # It learns, so equal losses after iteration 1 also compare the backward passes.
    assert local_losses[ITERS] < local_losses[1] - 0.1, local_losses
    for it in range(1, ITERS + 1):
        assert sdpa_losses[it] == pytest.approx(local_losses[it], rel=0, abs=1e-5), (it, sdpa_losses, local_losses)
        assert sdpa_norms[it] == pytest.approx(local_norms[it], rel=1e-4), (it, sdpa_norms, local_norms)


# --- arguments -------------------------------------------------------------------------------

BASE = ["--model-size", "tiny", "--vocab-size", "1024", "--mock-data", "--train-iters", "10", "--lr", "1e-3"]


def test_attention_backend_defaults_to_sdpa_and_takes_local():
    assert parse_job_config(BASE, world_size=1).training.attention_backend == "sdpa"
    assert parse_job_config(BASE + ["--attention-backend", "local"], world_size=1).training.attention_backend == "local"
    from models.gpt import default_attention_backend

    assert default_attention_backend("transformer_engine") == "transformer_engine"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--transformer-impl", "transformer_engine", "--attention-backend", "sdpa"],
         "--attention-backend sdpa contradicts --transformer-impl transformer_engine"),
        (["--transformer-impl", "transformer_engine", "--attention-backend", "local"],
         "--attention-backend local contradicts --transformer-impl transformer_engine"),
        (["--attention-backend", "transformer_engine"],
         "--attention-backend transformer_engine needs --transformer-impl transformer_engine"),
    ],
)
def test_contradictory_backend_and_transformer_impl_are_refused(extra, message):
    with pytest.raises(ArgumentError, match=message):
        parse_job_config(BASE + extra, world_size=1)


def test_unknown_backend_is_refused_by_the_parser_and_the_config():
    from trainer.arguments import ArgumentError
    from trainer.config import TrainingConfig

    with pytest.raises(ArgumentError, match="--attention-backend: invalid choice: 'flash'"):
        parse_job_config(BASE + ["--attention-backend", "flash"], world_size=1)
    with pytest.raises(ValueError, match="--attention-backend must be one of"):
        TrainingConfig(train_iters=1, attention_backend="flash")
    with pytest.raises(ValueError, match="--attention-backend sdpa contradicts --transformer-impl transformer_engine"):
        TrainingConfig(train_iters=1, transformer_impl="transformer_engine", attention_backend="sdpa")
    # Not given: the default of the layer spec.
    assert TrainingConfig(train_iters=1).attention_backend == "sdpa"
    assert TrainingConfig(train_iters=1, transformer_impl="transformer_engine").attention_backend == "transformer_engine"
