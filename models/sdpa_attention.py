"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, as a layer spec.

megatron-core's local layer spec computes attention with ``DotProductAttention``, which
materialises the ``[b, np, s, s]`` score and probability matrices (and keeps them for backward).
:class:`SDPAttention` is a drop-in replacement with the same constructor and ``forward``
signatures that calls PyTorch's fused kernel instead: flash or memory-efficient attention on a
GPU, the fused flash kernel on CPU. It computes the same function as ``DotProductAttention`` for
what this GPT uses (causal self-attention, optionally grouped-query heads, vanilla softmax) and
refuses everything else with a :class:`SDPAttentionUnsupported` naming the setting.

:func:`get_gpt_layer_sdpa_spec` is ``get_gpt_layer_local_spec()`` with only ``core_attention``
replaced, so every other module (linear layers, norms, MLP, bias-dropout-add) stays megatron's.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor


class SDPAttentionUnsupported(ValueError):
    """A model setting or forward input that :class:`SDPAttention` does not implement."""


# The last attention mask verified to be the causal mask. The trainer passes one mask object to
# every layer and micro-batch of an iteration, so it is compared once per iteration, not per layer.
_last_causal_mask: Optional[weakref.ref] = None


def _require_causal_mask(mask: Tensor, sq: int, sk: int) -> None:
    """Refuse a mask that is not megatron's causal mask (True above the diagonal = masked out).

    SDPA gets ``is_causal=True`` and no mask (a mask would rule out the flash kernels), so a
    padding or document mask passed with a causal mask type would otherwise be ignored silently.
    """
    global _last_causal_mask
    if _last_causal_mask is not None and _last_causal_mask() is mask:
        return
    if mask.dtype != torch.bool:
        raise SDPAttentionUnsupported(
            f"attention_mask of dtype {mask.dtype}: sdpa attention takes megatron's boolean causal mask "
            "(True = masked out) or None; use --attention-backend local for other masks"
        )
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (sq, sk) or mask.shape[1] != 1:
        raise SDPAttentionUnsupported(
            f"attention_mask of shape {tuple(mask.shape)}: sdpa attention takes a causal mask of shape "
            f"[b or 1, 1, {sq}, {sk}]; use --attention-backend local for other masks"
        )
    causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu_(1)
    if not bool((mask == causal).all()):
        raise SDPAttentionUnsupported(
            "attention_mask is not the causal mask (padding or per-document masks are not supported "
            "by sdpa attention); use --attention-backend local"
        )
    _last_causal_mask = weakref.ref(mask)


class SDPAttention(MegatronModule):
    """Causal core attention with ``F.scaled_dot_product_attention``; the interface of megatron-core
    0.16.1's ``DotProductAttention``: query/key/value ``[sq, b, np (ng for key/value), hn]`` in,
    ``[sq, b, np * hn]`` out.

    Same function as ``DotProductAttention``: scale ``softmax_scale`` or ``1/sqrt(hn)`` (megatron's
    ``apply_query_key_layer_scaling`` divides the scores by the layer number and multiplies them
    back inside its fp32 softmax, which cancels; the SDPA kernels run the softmax in fp32
    whatever ``attention_softmax_in_fp32`` says), causal mask, dropout on the probabilities drawn
    inside the tensor-parallel RNG tracker's fork unless sequence parallelism is on, as megatron
    draws it (the dropout pattern itself is the kernel's, not ``torch.nn.Dropout``'s).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size > 1": config.context_parallel_size != 1,
            f"softmax_type {config.softmax_type!r} (only 'vanilla')": config.softmax_type != "vanilla",
            "window_size (sliding-window attention)": config.window_size is not None,
            f"attn_mask_type {attn_mask_type} (only causal)": attn_mask_type != AttnMaskType.causal,
        }
        for what, refused in unsupported.items():
            if refused:
                raise SDPAttentionUnsupported(f"sdpa attention does not support {what}; use --attention-backend local")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise SDPAttentionUnsupported("SDPAttention's pg_collection has no tensor-parallel group 'tp'")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        # The net scale of DotProductAttention: its apply_query_key_layer_scaling coefficient
        # divides the scores and multiplies them again in the softmax.
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None else softmax_scale
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise SDPAttentionUnsupported("packed sequences are not supported by sdpa attention; use TransformerEngine")
        if attention_bias is not None:
            raise SDPAttentionUnsupported("attention_bias is not supported by sdpa attention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise SDPAttentionUnsupported(f"attn_mask_type {mask_type} is not supported by sdpa attention (only causal)")
        sq, sk = query.size(0), key.size(0)
        if sq != sk:
            # is_causal aligns the mask to the top-left corner: right only for self-attention
            # over the whole sequence (no KV cache).
            raise SDPAttentionUnsupported(f"sdpa attention needs as many queries as keys (causal self-attention), got {sq} and {sk}")
        if attention_mask is not None:
            _require_causal_mask(attention_mask, sq, sk)

        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # grouped-query attention: as DotProductAttention, repeat each key/value head
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)

        # [s, b, np, hn] -> [b, np, s, hn]: a view, the last dimension stays contiguous.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # As DotProductAttention: TP ranks hold different heads, so their dropout draws from
            # the tracker's per-TP-rank stream (the kernel takes the device's default generator,
            # which fork() swaps).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, s, hn] -> [s, b, np * hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)


def get_gpt_layer_sdpa_spec(normalization: str = "LayerNorm"):
    """megatron-core's local GPT layer spec (with ``normalization``'s norm modules) with
    ``core_attention`` = :class:`SDPAttention`."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    attention = spec.submodules.self_attention.submodules
    # Replace only what we expect to replace: a megatron change of the local spec should fail here.
    if attention.core_attention is not DotProductAttention:
        raise TypeError(
            f"megatron-core's local spec has core_attention {attention.core_attention!r}, expected "
            "DotProductAttention; models/sdpa_attention.py needs updating for this megatron-core version"
        )
    attention.core_attention = SDPAttention
    return spec
