"""Our own device-agnostic pipeline schedules: 1F1B for training, forward-only for evaluation.

megatron-core's schedules allocate with ``device="cuda"`` literals; these allocate on the
device of the tensors they are given. Activations between stages are
``[seq_length, micro_batch_size, hidden]`` tensors, sent point-to-point within the pipeline group.

1F1B (PipeDream-Flush, as in Megatron-LM): stage ``p`` of ``P`` runs ``P - p - 1`` warm-up
forwards, then alternates one forward and one backward, then drains the remaining backwards.
At most ``P - p`` micro-batches of activations are alive on a stage.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from trainer.data import Batch
from trainer.parallel_dims import ParallelGroups

# Called around each phase so a tracer can record it: ``phase(name)`` returns a context manager.
PhaseHook = Callable[[str], "object"]


@dataclass(frozen=True)
class PipelineShape:
    """What flows between stages."""

    seq_length: int
    """Tokens per sample (the causal mask's size)."""
    activation_shape: tuple[int, int, int]
    """``(sequence, micro_batch_size, hidden_size)`` sent between stages: the whole sequence, or
    this TP rank's part of it with sequence parallelism."""
    dtype: torch.dtype
    device: torch.device


class _P2P:
    """Point-to-point exchange with the neighbouring stages."""

    def __init__(self, groups: ParallelGroups, shape: PipelineShape):
        self.g = groups
        self.shape = shape

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.shape.activation_shape, dtype=self.shape.dtype, device=self.shape.device)

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post all sends and receives as one batch, then wait.

        Batched (``batch_isend_irecv``) so that two neighbours that both send before they
        receive cannot deadlock on NCCL, where a send can block until its receive is posted.
        """
        ops, received = [], {}
        group = self.g.pp_group
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.g.next_stage_rank, group))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.g.prev_stage_rank, group))
        if recv_prev:
            received["prev"] = self._empty()
            ops.append(dist.P2POp(dist.irecv, received["prev"], self.g.prev_stage_rank, group))
        if recv_next:
            received["next"] = self._empty()
            ops.append(dist.P2POp(dist.irecv, received["next"], self.g.next_stage_rank, group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received.get("prev"), received.get("next")


def _forward(model, batch: Batch, input_tensor, groups: ParallelGroups, attention_mask, num_microbatches):
    """Forward one micro-batch; on the last stage returns (scaled loss, unscaled loss)."""
    if not groups.is_first_stage:
        model.set_input_tensor(input_tensor)
    output = model(
        batch.tokens if groups.is_first_stage else None,
        batch.position_ids if groups.is_first_stage else None,
        attention_mask,
        labels=batch.labels if groups.is_last_stage else None,
    )
    if not groups.is_last_stage:
        return output, None
    mask = batch.loss_mask
    loss = torch.sum(output.float() * mask) / mask.sum()
    return loss / num_microbatches, loss.detach()


def _backward(input_tensor, output, output_grad):
    if input_tensor is not None:
        input_tensor.retain_grad()
    if output_grad is None:
        torch.autograd.backward(output)
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    return input_tensor.grad if input_tensor is not None else None


def causal_attention_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, s, s]`` boolean mask, True where attention is not allowed (future tokens)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


def forward_backward_1f1b(
    model,
    microbatches: Iterator[Batch],
    num_microbatches: int,
    groups: ParallelGroups,
    shape: PipelineShape,
    phase: PhaseHook,
) -> list[torch.Tensor]:
    """Run forward and backward of every micro-batch; returns the losses (last stage only)."""
    p2p = _P2P(groups, shape)
    mask = causal_attention_mask(shape.seq_length, shape.device)
    pp, stage = groups.dims.pipeline_parallel, groups.pp_rank
    warmup = min(pp - stage - 1, num_microbatches)
    steady = num_microbatches - warmup
    first, last = groups.is_first_stage, groups.is_last_stage
    alive: deque = deque()
    losses: list[torch.Tensor] = []

    def recv_input():
        if first:
            return None
        with phase("recv-forward"):
            tensor, _ = p2p.exchange(recv_prev=True)
        return tensor.requires_grad_()

    def run_forward(input_tensor):
        with phase("forward"):
            output, loss = _forward(model, next(microbatches), input_tensor, groups, mask, num_microbatches)
        if loss is not None:
            losses.append(loss)
        alive.append((input_tensor, output))
        return output

    def run_backward(output_grad):
        input_tensor, output = alive.popleft()
        with phase("backward"):
            return _backward(input_tensor, output, output_grad)

    for _ in range(warmup):
        output = run_forward(recv_input())
        with phase("send-forward"):
            p2p.exchange(send_next=output)

    input_tensor = recv_input() if steady > 0 else None
    for i in range(steady):
        output = run_forward(input_tensor)
        output_grad = None
        if not last:
            with phase("send-forward-recv-backward"):
                _, output_grad = p2p.exchange(send_next=output, recv_next=True)
        input_grad = run_backward(output_grad)
        if i == steady - 1:
            input_tensor = None
            if not first:
                with phase("send-backward"):
                    p2p.exchange(send_prev=input_grad)
        elif not first:
            with phase("send-backward-recv-forward"):
                input_tensor, _ = p2p.exchange(send_prev=input_grad, recv_prev=True)
            input_tensor.requires_grad_()
        else:
            input_tensor = None

    for _ in range(warmup):
        output_grad = None
        if not last:
            with phase("recv-backward"):
                _, output_grad = p2p.exchange(recv_next=True)
        input_grad = run_backward(output_grad)
        if not first:
            with phase("send-backward"):
                p2p.exchange(send_prev=input_grad)
    return losses


@torch.no_grad()
def forward_only(
    model,
    microbatches: Iterator[Batch],
    num_microbatches: int,
    groups: ParallelGroups,
    shape: PipelineShape,
) -> list[torch.Tensor]:
    """Forward every micro-batch through the pipeline (evaluation); losses on the last stage."""
    p2p = _P2P(groups, shape)
    mask = causal_attention_mask(shape.seq_length, shape.device)
    losses = []
    for _ in range(num_microbatches):
        input_tensor = None if groups.is_first_stage else p2p.exchange(recv_prev=True)[0]
        output, loss = _forward(model, next(microbatches), input_tensor, groups, mask, num_microbatches)
        if groups.is_last_stage:
            losses.append(loss)
        else:
            p2p.exchange(send_next=output)
    return losses
