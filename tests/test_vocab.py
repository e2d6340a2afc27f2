"""The padded vocabulary is no part of the model's function: its logits are masked to -inf, the
cross entropy equals the one over the true vocabulary (also split over TP ranks, a slice of which
may be all padding), and its rows start at 0 and stay 0 through training."""

import math

import pytest
import torch

from models.vocab import (
    VOCAB_PARAMS,
    PaddedLogitsMask,
    install_padded_logits_mask,
    padding_mask,
    true_vocab_rows,
    with_padding_rows,
)


class FakeOutputLayer(torch.nn.Module):
    """Returns ``(logits, None)`` like megatron's ColumnParallelLinear, logits given by the test."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, hidden):
        return self.logits, None


def test_vocabulary_parameters_and_their_true_rows():
    assert VOCAB_PARAMS == ("embedding.word_embeddings.weight", "output_layer.weight")
    assert true_vocab_rows("embedding.word_embeddings.weight", 257) == 257
    assert true_vocab_rows("output_layer.weight", 257) == 257
    assert true_vocab_rows("embedding.position_embeddings.weight", 257) is None
    assert true_vocab_rows("decoder.layers.0.mlp.linear_fc1.weight", 257) is None


def test_padding_rows_are_zero_and_true_rows_kept_from_any_padded_size():
    values = torch.randn(5, 3)
    padded = with_padding_rows(values, 5, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], values) and not padded[5:].any()
    # Another layout's padded tensor (resharding): the true rows survive, the padding is rebuilt.
    assert torch.equal(with_padding_rows(padded, 5, 6), padded[:6])
    with pytest.raises(ValueError, match="fewer than 5"):
        with_padding_rows(values[:4], 5, 8)
    with pytest.raises(ValueError, match="true vocabulary"):
        with_padding_rows(values, 5, 4)


@pytest.mark.parametrize("true_vocab, padded, tp_size, rank, first_padded", [
    (200, 256, 2, 0, None),  # slice [0, 128): all true
    (200, 256, 2, 1, 72),    # slice [128, 256): 72 true, then padding
    (128, 512, 4, 2, 0),     # slice [256, 384): all padding
    (128, 128, 1, 0, None),  # no padding at all
])
def test_hook_masks_this_ranks_padded_columns_out_of_place(true_vocab, padded, tp_size, rank, first_padded):
    columns = padded // tp_size
    logits = torch.randn(3, 2, columns)
    layer = FakeOutputLayer(logits)
    layer.register_forward_hook(PaddedLogitsMask(true_vocab, padded, rank, tp_size))
    masked, bias = layer(None)
    assert bias is None
    keep = columns if first_padded is None else first_padded
    assert torch.equal(masked[..., :keep], logits[..., :keep])
    assert torch.all(masked[..., keep:] == float("-inf"))
    assert torch.isfinite(logits).all(), "the layer's own output is not modified"


def test_hook_masks_gathered_logits_and_refuses_other_widths():
    hook = PaddedLogitsMask(200, 256, tp_rank=0, tp_size=2)
    gathered = torch.zeros(1, 1, 256)
    masked, _ = hook(None, (), (gathered, None))
    assert torch.isfinite(masked[..., :200]).all() and torch.all(masked[..., 200:] == float("-inf"))
    with pytest.raises(RuntimeError, match="100 wide"):
        hook(None, (), (torch.zeros(1, 1, 100), None))


def test_nothing_is_installed_without_padding_and_bad_layouts_are_refused():
    assert install_padded_logits_mask(FakeOutputLayer(torch.zeros(1)), 256, 256, 0, 2) is None
    with pytest.raises(ValueError, match="equal slices"):
        PaddedLogitsMask(100, 130, 0, 4)
    with pytest.raises(ValueError, match="not in a group"):
        PaddedLogitsMask(100, 128, 2, 2)
    assert padding_mask(100, 0, 100) is None


def _tensor_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_size: int):
    """megatron-core's vocab-parallel cross entropy, its TP ranks run one after the other here:
    its own per-rank steps, with the all-reduces (MAX, SUM) done across the slices by hand.
    Returns the loss and the gradient of its sum with respect to ``logits``."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as CE

    slices = [s.clone() for s in logits.chunk(tp_size, dim=-1)]
    columns = slices[0].shape[-1]
    maxes = [CE.calculate_logits_max(s)[1] for s in slices]
    global_max = torch.stack(maxes).max(dim=0).values
    parts = [CE.calculate_predicted_logits(s, target, global_max, r * columns, (r + 1) * columns)
             for r, s in enumerate(slices)]
    predicted = sum(p[2] for p in parts)
    sum_exp = sum(p[3] for p in parts)
    grads, loss = [], None
    for target_mask, masked_target, _, _, exp_logits in parts:
        softmax, loss = CE.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        grad_2d, arange, update, grad_input = CE.prepare_gradient_calculation_operands(softmax, target_mask)
        grads.append(CE.calculate_gradients(grad_2d, arange, masked_target, update, grad_input, torch.ones_like(loss)))
    return loss, torch.cat(grads, dim=-1)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_cross_entropy_over_masked_logits_is_over_the_true_vocabulary(tp_size):
    """Vocabulary 128 padded to 512: at TP4, three ranks hold nothing but padding (local max -inf)."""
    true_vocab, padded = 128, 512
    torch.manual_seed(0)
    logits = torch.randn(8, 2, padded) * 3
    target = torch.randint(0, true_vocab, (8, 2))
    masked = logits.masked_fill(padding_mask(true_vocab, 0, padded), float("-inf"))
    loss, grad = _tensor_parallel_cross_entropy(masked, target, tp_size)
    true_logits = logits[..., :true_vocab].detach().requires_grad_()
    expected = torch.nn.functional.cross_entropy(true_logits.reshape(-1, true_vocab), target.reshape(-1), reduction="none")
    expected.sum().backward()
    assert torch.isfinite(loss).all() and torch.allclose(loss, expected.view_as(loss), atol=1e-5)
    assert torch.allclose(grad[..., :true_vocab], true_logits.grad, atol=1e-6)
    assert torch.equal(grad[..., true_vocab:], torch.zeros_like(grad[..., true_vocab:]))


@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_padded_rows_stay_zero_through_training(megatron_state, untie):
    """Vocabulary 100 padded to 128 at TP1: after AdamW steps with weight decay, the padded rows
    are still exactly 0 and the loss is the true vocabulary's (the first step's near ln 100)."""
    from models.config import GPTModelConfig
    from models.gpt import build_gpt_model
    from models.param_layout import global_param_specs

    cfg = GPTModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=8,
                         max_position_embeddings=8, vocab_size=100, hidden_dropout=0.0, attention_dropout=0.0,
                         untie_embeddings_and_output_weights=untie)
    model = build_gpt_model(cfg, tensor_parallel=1, pipeline_parallel=1, pre_process=True, post_process=True,
                            device=torch.device("cpu"), attention_backend="local")
    specs = global_param_specs(model)
    vocab_params = {name: p for name, p in model.named_parameters() if specs[name].global_name in VOCAB_PARAMS}
    assert len(vocab_params) == (2 if untie else 1)
    assert all(p.shape[0] == 128 and not p[100:].any() for p in vocab_params.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(8).unsqueeze(0).expand(4, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    losses = []
    for _ in range(3):
        tokens = torch.randint(0, 100, (4, 9), generator=generator)
        loss = model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        for p in vocab_params.values():
            assert not p.grad[100:].any()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(100)) < 0.1, losses
    for name, p in vocab_params.items():
        assert not p[100:].any(), name
        assert p[:100].abs().sum() > 0, name
    logits = model(tokens[:, :-1], positions, mask)
    assert torch.all(logits[..., 100:] == float("-inf")) and torch.isfinite(logits[..., :100]).all()
