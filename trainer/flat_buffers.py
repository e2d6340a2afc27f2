"""Model parameters and their gradients in two flat buffers.

Every parameter of this rank's model stage becomes a view into one contiguous parameter buffer
(model dtype) and accumulates its gradient into one contiguous fp32 gradient buffer. One buffer
makes data-parallel reduction one collective, lets the distributed optimizer own a contiguous
range of it, and lets the checkpoint engine copy state in a few large pieces.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer import iteration_signals


@dataclass(frozen=True)
class ParamSpan:
    """The span ``[start, end)`` of the flat buffers that holds one parameter, and what the
    optimizer needs to know of it."""

    name: str
    """Local parameter name (``module.named_parameters()``)."""
    start: int
    """First element in the flat buffers."""
    numel: int
    """Number of elements."""
    shape: tuple[int, ...]
    """Local shape."""
    row_numel: int
    """Elements per row (dim 0); a shard boundary inside this parameter is a multiple of it."""
    weight_decay: bool
    """Decoupled weight decay applies (matrices and embeddings; not biases or norms)."""
    counts_in_grad_norm: bool
    """Its gradient enters the global norm once over all ranks (not a TP or tied duplicate)."""
    shared_embedding: bool
    """The word embedding / output weight tied across the first and last pipeline stage."""
    sequence_parallel: bool = False
    """Replicated over TP but fed a part of the sequence on each TP rank (norms, row-parallel
    biases under ``--sequence-parallel``): its gradient is summed over TP."""

    @property
    def end(self) -> int:
        return self.start + self.numel


@dataclass(frozen=True)
class ParamFacts:
    """What the flat layout needs to know of one parameter (no tensor: the scale simulator,
    ``benchmarks.scale``, lays out models no machine here could hold)."""

    name: str
    """Local parameter name."""
    numel: int
    """Number of elements."""
    shape: tuple[int, ...]
    """The shape it is laid out by (its own, or a view with the same elements)."""
    dim: int
    """The parameter's own number of dimensions (matrices and embeddings decay)."""
    tp_duplicate: bool
    """Replicated over TP and this is not TP rank 0: its gradient is not counted in the norm."""
    tied_copy: bool
    """The last stage's copy of the tied embeddings (megatron's ``shared``)."""
    shared_embedding: bool
    """The word embedding / output weight tied across the first and last pipeline stage."""
    sequence_parallel: bool
    """Its gradient is summed over TP (see :attr:`ParamSpan.sequence_parallel`)."""


def layout_spans(params: list[ParamFacts]) -> list[ParamSpan]:
    """The parameters one after another in the flat buffers, in the given order."""
    spans: list[ParamSpan] = []
    offset = 0
    for p in params:
        shape = p.shape
        row = p.numel // shape[0] if len(shape) >= 1 and shape[0] > 0 else p.numel
        spans.append(
            ParamSpan(
                name=p.name,
                start=offset,
                numel=p.numel,
                shape=shape,
                row_numel=max(row, 1),
                weight_decay=p.dim >= 2,
                counts_in_grad_norm=not p.tp_duplicate and not p.tied_copy,
                shared_embedding=p.shared_embedding,
                sequence_parallel=p.sequence_parallel,
            )
        )
        offset += p.numel
    return spans


class RowGeometry:
    """The spans of the flat buffers and their row boundaries, without the buffers: what the
    optimizer's ranges and shards are cut by (the trainer's buffers and the scale simulator)."""

    def __init__(self, spans: list[ParamSpan]):
        self.spans = spans
        self.numel = spans[-1].end if spans else 0
        self._starts = [s.start for s in spans]

    # -- row geometry (shard and DP-range boundaries fall on rows) ------------------------------
    def span_at(self, element: int) -> ParamSpan:
        return self.spans[bisect.bisect_right(self._starts, element) - 1]

    def row_boundary(self, element: int, round_up: bool = False) -> int:
        """The nearest row boundary at or below ``element`` (or at or above with round_up)."""
        if element <= 0:
            return 0
        if element >= self.numel:
            return self.numel
        span = self.span_at(element)
        rows, rest = divmod(element - span.start, span.row_numel)
        if rest and round_up:
            rows += 1
        return min(span.start + rows * span.row_numel, span.end)

    def segments(self, start: int, end: int, predicate, merge: bool = True) -> list[tuple[int, int]]:
        """``[a, b)`` ranges within ``[start, end)`` covered by spans matching ``predicate``;
        adjacent ranges are merged unless ``merge`` is False (then one range per span)."""
        result: list[tuple[int, int]] = []
        if start >= end:
            return result
        i = bisect.bisect_right(self._starts, start) - 1
        while i < len(self.spans) and self.spans[i].start < end:
            span = self.spans[i]
            if predicate(span):
                a, b = max(span.start, start), min(span.end, end)
                if merge and result and result[-1][1] == a:
                    result[-1] = (result[-1][0], b)
                else:
                    result.append((a, b))
            i += 1
        return result


class FlatParamsAndGrads(RowGeometry):
    """Owns the flat parameter and gradient buffers of one model stage."""

    def __init__(self, model: torch.nn.Module, tp_rank: int = 0, tp_split: frozenset[str] = frozenset(),
                 shapes: dict[str, tuple[int, ...]] | None = None):
        """``tp_split`` names the parameters split over tensor-parallel ranks; the others are
        replicated on every TP rank, so only TP rank 0 counts them in the gradient norm.
        ``shapes``: the shape a parameter is laid out by, where it is a view of the parameter's own
        (SwiGLU's ``linear_fc1`` as ``(2, rows, ...)``): its rows are the unit of shard boundaries."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model stage has no trainable parameters")
        device = params[0][1].device
        dtype = params[0][1].dtype
        super().__init__(layout_spans([
            ParamFacts(
                name=name,
                numel=p.numel(),
                shape=tuple((shapes or {}).get(name, p.shape)),
                dim=p.dim(),
                tp_duplicate=name not in tp_split and tp_rank != 0,
                tied_copy=bool(getattr(p, "shared", False)),  # megatron: last stage's copy of embeddings
                shared_embedding=bool(getattr(p, "shared_embedding", False)),
                sequence_parallel=bool(getattr(p, "sequence_parallel", False)),
            )
            for name, p in params
        ]))
        offset = self.numel
        self.params = torch.empty(offset, dtype=dtype, device=device)
        # The step's flags (``trainer.iteration_signals``) ride after the gradients: the
        # data-parallel all-reduce of the gradients carries them at no extra collective.
        self._grads_and_signals = torch.zeros(offset + iteration_signals.COUNT, dtype=torch.float32, device=device)
        self.grads = self._grads_and_signals[:offset]
        self.signals = self._grads_and_signals[offset:]
        """This rank's flags for the step (set after ``zero_grads``), summed over data-parallel
        ranks by ``reduce_grads`` where it all-reduces the whole buffer."""
        self._hooks = []
        for span, (_, p) in zip(self.spans, params):
            view = self.params[span.start : span.end].view(p.shape)
            view.copy_(p.data)
            p.data = view
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(span)))

    def _make_hook(self, span: ParamSpan):
        grad_view = self.grads[span.start : span.end]

        def accumulate(param: torch.Tensor) -> None:
            grad_view.add_(param.grad.reshape(-1))
            param.grad = None

        return accumulate

    # -- gradient reduction -------------------------------------------------------------------
    def zero_grads(self) -> None:
        self._grads_and_signals.zero_()

    def allreduce_tied_embedding_grads(self, embedding_group) -> None:
        """Sum the tied word-embedding gradient of the first and last pipeline stage."""
        if embedding_group is None:
            return
        for span in self.spans:
            if span.shared_embedding:
                dist.all_reduce(self.grads[span.start : span.end], group=embedding_group)

    def allreduce_sequence_parallel_grads(self, tp_group) -> None:
        """Sum over TP the gradients of parameters that saw only this rank's part of the sequence."""
        ranges = self.segments(0, self.numel, lambda slot: slot.sequence_parallel)
        if not ranges or dist.get_world_size(tp_group) == 1:
            return
        # One collective: the marked parameters are scattered through the buffer.
        packed = torch.cat([self.grads[a:b] for a, b in ranges])
        dist.all_reduce(packed, group=tp_group)
        offset = 0
        for a, b in ranges:
            self.grads[a:b].copy_(packed[offset : offset + b - a])
            offset += b - a

    def reduce_grads(self, dp_group, dp_size: int, owned: list[tuple[int, int]] | None) -> None:
        """Average gradients over data-parallel ranks.

        ``owned`` lists each DP rank's range when the optimizer is distributed: then only the
        own range must be reduced (reduce-scatter where the backend has it; gloo has not, so
        there it is an all-reduce of the whole buffer).
        """
        if dp_size == 1:
            return
        self.grads.div_(dp_size)
        if owned is not None and dist.get_backend(dp_group) == "nccl":
            rank = dist.get_rank(dp_group)
            a, b = owned[rank]
            # The output may not alias an input: reduce our own range from a copy.
            inputs = [self.grads[lo:hi] for lo, hi in owned]
            inputs[rank] = inputs[rank].clone()
            dist.reduce_scatter(self.grads[a:b], inputs, group=dp_group)
        else:
            dist.all_reduce(self._grads_and_signals, group=dp_group)
