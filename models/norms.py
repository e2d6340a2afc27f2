"""LayerNorm and RMSNorm for megatron-core's local layer spec, with sequence parallelism.

megatron-core's own torch norm (``WrappedTorchNorm``) refuses sequence parallelism: with it each
TP rank normalises its own part of the sequence, so a norm's weight gradient on one rank is a
partial sum, and megatron leaves the all-reduce over TP to its DDP wrapper, which this trainer
does not use. :class:`TorchNorm` builds the same torch module and marks its parameters with
megatron's ``sequence_parallel`` attribute; :meth:`trainer.flat_buffers.FlatParamsAndGrads.allreduce_sequence_parallel_grads`
then sums the marked gradients over TP (as megatron's ``finalize_model_grads`` does).
"""

from __future__ import annotations

import torch


class TorchNorm:
    """``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` as the config's ``normalization`` says."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("zero-centred-gamma and memory-efficient norms are not supported by the torch norms")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r}: only LayerNorm and RMSNorm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_torch_norms(layer_spec):
    """The local layer spec with :class:`TorchNorm` where it has megatron's ``WrappedTorchNorm``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    layer = layer_spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer, name) is WrappedTorchNorm:
            setattr(layer, name, TorchNorm)
    return layer_spec


def block_spec(config, layer_spec):
    """The transformer block of this pipeline stage: its layers and a :class:`TorchNorm` as the
    final norm (megatron's default there is ``WrappedTorchNorm`` without Apex or TE)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=TorchNorm)
