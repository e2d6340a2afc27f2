"""The padded vocabulary: which parameters have it, and the logits of its padding masked out.

Megatron pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by`` x TP (see
:meth:`models.config.GPTModelConfig.padded_vocab_size`), so the padded size depends on the
tensor-parallel layout: vocabulary 128 is 128 entries at TP1, 256 at TP2, 512 at TP4. Left alone,
the padded entries are real output classes: the softmax spreads mass over them, and the same
model is a different function at another TP degree (ln 128 vs ln 256 at the first iteration).

Two things make the model layout-independent:

* the logits of padded entries are -inf (:func:`mask_padded_vocab`), so they get probability 0
  and gradient 0;
* the padded rows of the vocabulary parameters start at 0 (:func:`with_padding_rows`, used by
  :func:`models.gpt.initial_value`); with no gradient (no input id reaches them, masked logits
  get none) and decoupled weight decay, they stay exactly 0 through training.

Checkpoint resharding uses :data:`VOCAB_PARAMS` and :func:`true_vocab_rows` to carry only the
true vocabulary rows from one layout to another.
"""

from __future__ import annotations

import torch

VOCAB_PARAMS: tuple[str, ...] = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Global names (:attr:`models.param_layout.GlobalParamSpec.global_name`) of the parameters whose
dimension :data:`VOCAB_DIM` is the padded vocabulary. ``output_layer.weight`` exists only with
``--untie-embeddings-and-output-weights``; a tied output layer shares the embedding's name."""

VOCAB_DIM = 0
"""The dimension of a :data:`VOCAB_PARAMS` tensor that runs over the (padded) vocabulary."""


def true_vocab_rows(global_name: str, true_vocab: int) -> int | None:
    """How many leading rows (along :data:`VOCAB_DIM`) of the global tensor are real vocabulary
    entries: ``true_vocab`` for a vocabulary parameter, None for any other parameter (whose
    shape does not depend on the padding). Rows past it are padding and hold zeros."""
    if true_vocab <= 0:
        raise ValueError(f"the vocabulary size must be positive, got {true_vocab}")
    return true_vocab if global_name in VOCAB_PARAMS else None


def with_padding_rows(values: torch.Tensor, true_vocab: int, padded_vocab: int) -> torch.Tensor:
    """``values``' first ``true_vocab`` rows, followed by zero rows up to ``padded_vocab`` rows.

    ``values`` may have exactly the true rows (initialisation) or another layout's padded rows
    (resharding a checkpoint to another TP degree): either way the result is the tensor of the
    layout whose padded size is ``padded_vocab``, with its padding at 0.
    """
    if not 0 < true_vocab <= padded_vocab:
        raise ValueError(f"need 0 < true vocabulary ({true_vocab}) <= padded vocabulary ({padded_vocab})")
    if values.dim() < 1 or values.shape[VOCAB_DIM] < true_vocab:
        raise ValueError(f"a tensor of shape {tuple(values.shape)} has fewer than {true_vocab} vocabulary rows")
    padded = values.new_zeros((padded_vocab, *values.shape[1:]))
    padded[:true_vocab] = values[:true_vocab]
    return padded


def padding_mask(true_vocab: int, first_column: int, columns: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Bool mask over the logits of global vocabulary columns ``[first_column, first_column +
    columns)``: True where the column is padding (>= ``true_vocab``). None if none of them is."""
    if first_column + columns <= true_vocab:
        return None
    return torch.arange(first_column, first_column + columns, device=device) >= true_vocab


class PaddedLogitsMask:
    """Forward hook of the output layer that sets the logits of padded vocabulary entries to -inf.

    Logits come as this TP rank's slice of the padded vocabulary (``columns_per_rank`` columns
    from ``tp_rank * columns_per_rank``), or, if megatron is asked to gather them
    (``runtime_gather_output``), as the whole padded vocabulary; the hook masks by which of the
    two it gets, and refuses any other width rather than mask the wrong columns.

    Why -inf is safe in megatron-core's ``vocab_parallel_cross_entropy`` (without label
    smoothing, which this trainer does not offer): it takes the max over the local slice and
    all-reduces it (MAX), so a rank whose whole slice is padding contributes -inf and the global
    max is still finite (the true vocabulary is not empty); logits - max stays -inf, exp gives
    exactly 0 to the sum and the softmax, and the gradient there (softmax - one-hot, never the
    target: targets are < vocabulary) is 0, which ``masked_fill``'s backward zeroes again.
    With label smoothing megatron would take log(softmax) = -inf at the padding and average it
    over the padded size: do not add label smoothing without a finite, vocabulary-aware variant.

    The fill is out of place: megatron's cross entropy subtracts the max from its input in place.
    """

    def __init__(self, true_vocab: int, padded_vocab: int, tp_rank: int, tp_size: int, device: torch.device | None = None):
        if tp_size <= 0 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} is not in a group of {tp_size}")
        if padded_vocab % tp_size:
            raise ValueError(f"padded vocabulary {padded_vocab} does not split into {tp_size} equal slices")
        if not 0 < true_vocab <= padded_vocab:
            raise ValueError(f"need 0 < true vocabulary ({true_vocab}) <= padded vocabulary ({padded_vocab})")
        columns = padded_vocab // tp_size
        self.columns_per_rank = columns
        self.padded_vocab = padded_vocab
        self.local_mask = padding_mask(true_vocab, tp_rank * columns, columns, device)
        self.gathered_mask = padding_mask(true_vocab, 0, padded_vocab, device)

    def mask_for(self, width: int) -> torch.Tensor | None:
        """The mask for logits ``width`` columns wide: a rank's slice, or the gathered vocabulary."""
        if width == self.columns_per_rank:
            return self.local_mask
        if width == self.padded_vocab:
            return self.gathered_mask
        raise RuntimeError(
            f"output layer gave logits {width} wide: neither this rank's vocabulary slice "
            f"({self.columns_per_rank}) nor the padded vocabulary ({self.padded_vocab})"
        )

    def __call__(
        self, module: torch.nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, bias = output  # ColumnParallelLinear returns (output, output bias)
        mask = self.mask_for(logits.shape[-1])
        if mask is None:
            return output
        if mask.device != logits.device:
            mask = mask.to(logits.device)
        return logits.masked_fill(mask, float("-inf")), bias


def install_padded_logits_mask(
    output_layer: torch.nn.Module, true_vocab: int, padded_vocab: int, tp_rank: int, tp_size: int,
    device: torch.device | None = None,
) -> torch.utils.hooks.RemovableHandle | None:
    """Hook :class:`PaddedLogitsMask` on ``output_layer``; None (nothing installed) when the
    vocabulary has no padding at all, so no layout pays for a hook that never masks.

    Every rank of a padded vocabulary gets the hook, also one whose own slice has no padding:
    gathered logits would hold the padding of the others."""
    if padded_vocab == true_vocab:
        return None
    hook = PaddedLogitsMask(true_vocab, padded_vocab, tp_rank, tp_size, device)
    return output_layer.register_forward_hook(hook)


def mask_padded_vocab(model: torch.nn.Module, true_vocab: int, device: torch.device | None = None) -> torch.utils.hooks.RemovableHandle | None:
    """Mask the padded vocabulary's logits of megatron-core's ``GPTModel`` ``model`` (this rank's
    stage); None where nothing is installed: a stage without the output layer (not the last
    pipeline stage) or a vocabulary without padding. TP rank and size come from megatron-core's
    ``parallel_state``, which the model was built under."""
    output_layer = getattr(model, "output_layer", None)
    if output_layer is None:
        return None
    from megatron.core import parallel_state

    return install_padded_logits_mask(
        output_layer,
        true_vocab,
        padded_vocab=output_layer.output_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        device=device,
    )
