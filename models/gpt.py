"""Build megatron-core's ``GPTModel`` for one pipeline stage and initialise it deterministically."""

from __future__ import annotations

import hashlib
import math

import torch

from models.config import GPTModelConfig, RecomputeConfig
from models.cpu_compat import apply_cpu_compat
from models.fusions import KernelFusions, ResolvedFusions, resolve_fusions
from models.norms import block_spec, with_torch_norms
from models.param_layout import GlobalParamSpec, global_param_specs
from models.vocab import VOCAB_DIM, mask_padded_vocab, true_vocab_rows, with_padding_rows

TRANSFORMER_IMPLS = ("local", "transformer_engine")
# Core attention inside the layer spec: ``sdpa`` = torch's fused scaled_dot_product_attention
# (models/sdpa_attention.py), ``local`` = megatron-core's unfused DotProductAttention,
# ``transformer_engine`` = TE's own, which comes with (and only with) TE's layer spec.
ATTENTION_BACKENDS = ("sdpa", "local", "transformer_engine")


class TransformerEngineUnavailable(RuntimeError):
    """``--transformer-impl transformer_engine`` was asked for where TE cannot run."""


def transformer_engine_status() -> str | None:
    """None when TransformerEngine imports, else the reason it does not.

    Ask only for a CUDA run (the caller knows the device): on a CPU machine a half-installed TE
    wheel breaks ``import megatron.core`` itself, so TE is never imported there.
    """
    try:
        import transformer_engine  # noqa: F401  (only probed on a CUDA machine)
    except ImportError as error:
        return f"transformer_engine does not import ({error}); install the extra: pip install .[gpu]"
    return None


def default_attention_backend(transformer_impl: str) -> str:
    """``--attention-backend`` when not given: TE's attention with TE's spec, else ``sdpa``."""
    return "transformer_engine" if transformer_impl == "transformer_engine" else "sdpa"


def check_attention_backend(transformer_impl: str, attention_backend: str) -> None:
    """Raise ``ValueError`` naming both flags if the two cannot go together."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
    if transformer_impl == "transformer_engine" and attention_backend != "transformer_engine":
        raise ValueError(
            f"--attention-backend {attention_backend} contradicts --transformer-impl transformer_engine, whose "
            "layer spec has TransformerEngine's own attention: drop --attention-backend (or pass "
            "--attention-backend transformer_engine), or use --transformer-impl local"
        )
    if transformer_impl != "transformer_engine" and attention_backend == "transformer_engine":
        raise ValueError(
            f"--attention-backend transformer_engine needs --transformer-impl transformer_engine (got "
            f"--transformer-impl {transformer_impl}); with --transformer-impl local, pass --attention-backend sdpa or local"
        )


def layer_spec(transformer_impl: str, attention_backend: str | None = None, normalization: str = "LayerNorm"):
    """megatron-core's layer spec: local (plain torch) or TransformerEngine.

    ``attention_backend`` (default :func:`default_attention_backend`) picks the local spec's core
    attention: ``sdpa`` (torch's fused kernel) or ``local`` (megatron's DotProductAttention).
    ``normalization`` (``LayerNorm`` or ``RMSNorm``) picks the local spec's norm modules; TE's spec
    reads it from the ``TransformerConfig``.
    """
    if attention_backend is None:
        attention_backend = default_attention_backend(transformer_impl)
    if transformer_impl in TRANSFORMER_IMPLS:
        check_attention_backend(transformer_impl, attention_backend)
    if transformer_impl == "local" and attention_backend == "sdpa":
        from models.sdpa_attention import get_gpt_layer_sdpa_spec

        return with_torch_norms(get_gpt_layer_sdpa_spec(normalization))
    if transformer_impl == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return with_torch_norms(get_gpt_layer_local_spec(normalization=normalization))
    if transformer_impl == "transformer_engine":
        reason = transformer_engine_status()
        if reason is not None:
            raise TransformerEngineUnavailable(
                f"--transformer-impl transformer_engine: {reason}. Use --transformer-impl local."
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")


def build_gpt_model(
    cfg: GPTModelConfig,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    pre_process: bool,
    post_process: bool,
    device: torch.device,
    params_dtype: torch.dtype = torch.float32,
    transformer_impl: str = "local",
    attention_backend: str | None = None,
    seed: int = 1234,
    fusions: ResolvedFusions | None = None,
    sequence_parallel: bool = False,
    recompute: RecomputeConfig = RecomputeConfig(),
):
    """This rank's stage of the GPT, with weights that do not depend on the parallel layout.

    megatron-core's own initialisation draws from the RNG in construction order, so a pipeline
    stage or a TP rank would get different weights than the single-process model. We skip it
    (``perform_initialization=False``) and fill every parameter from a generator seeded by its
    global name (see :func:`initialize_deterministically`). The vocabulary, padded to a size that
    depends on TP, is made layout-independent too: padded rows start at 0 and their logits are
    masked to -inf (:mod:`models.vocab`), so every layout trains the same function.

    ``fusions``: megatron-core's fused kernels to use, as :func:`models.fusions.resolve_fusions`
    granted them for ``device`` (default: the default requests, resolved here).
    ``sequence_parallel``: activations outside the tensor-parallel regions (norms, dropout,
    residuals) cut along the sequence over the TP ranks. ``recompute``: activation recomputation.
    """
    apply_cpu_compat(device)
    if transformer_impl == "transformer_engine" and device.type != "cuda":
        raise TransformerEngineUnavailable(
            f"--transformer-impl transformer_engine needs a CUDA device (this run is on {device.type}); "
            "use --transformer-impl local"
        )
    if fusions is None:
        fusions = resolve_fusions(KernelFusions(), device)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = layer_spec(transformer_impl, attention_backend, cfg.normalization)
    on_gpu = device.type == "cuda"
    config = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        num_query_groups=cfg.query_groups,
        add_bias_linear=not cfg.disable_bias_linear,
        gated_linear_unit=cfg.swiglu,
        activation_func=torch.nn.functional.silu if cfg.swiglu else torch.nn.functional.gelu,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        sequence_parallel=sequence_parallel,
        **recompute.transformer_config_kwargs(),
        gradient_accumulation_fusion=False,
        **fusions.transformer_config_kwargs(),
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    if transformer_impl == "local":
        spec = block_spec(config, spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(tensor_parallel),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
    )
    # Like Megatron-LM's Float16Module: every parameter in the training dtype, norms included
    # (torch's LayerNorm, used without Apex, is created in fp32 whatever params_dtype says).
    model.to(device=device, dtype=params_dtype)
    initialize_deterministically(model, cfg, seed)
    mask_padded_vocab(model, cfg.vocab_size, device)
    return model


def _generator_for(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def initial_value(spec: GlobalParamSpec, cfg: GPTModelConfig, seed: int) -> torch.Tensor:
    """The global tensor's initial value (fp32, CPU), as Megatron-LM initialises its kind.

    Biases 0, norm weights 1, output projections of attention and MLP normal with
    std / sqrt(2 x layers) (Megatron's scaled init), every other weight normal with std.
    Names cover both layer specs: local (``input_layernorm.weight``) and TransformerEngine's
    fused norms (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_bias``).

    A vocabulary parameter (:data:`models.vocab.VOCAB_PARAMS`) draws its normal values for the
    true vocabulary only and is padded with zero rows: the padded size depends on TP, and drawing
    for it would tie the padding's values, and the model, to the layout.
    """
    leaf = spec.global_name.rsplit(".", 2)
    module, kind = leaf[-2], leaf[-1]
    if kind.endswith("bias"):
        return torch.zeros(spec.global_shape)
    if "norm" in module or "norm" in kind:
        return torch.ones(spec.global_shape)
    std = cfg.init_method_std
    if module in ("linear_proj", "linear_fc2"):
        std = std / math.sqrt(2.0 * cfg.num_layers)
    true_rows = true_vocab_rows(spec.global_name, cfg.vocab_size)
    shape = list(spec.global_shape)
    if true_rows is not None:
        shape[VOCAB_DIM] = true_rows
    values = torch.empty(shape)
    values.normal_(0.0, std, generator=_generator_for(spec.global_name, seed))
    if true_rows is not None:
        values = with_padding_rows(values, true_rows, spec.global_shape[VOCAB_DIM])
    return values


@torch.no_grad()
def initialize_deterministically(model: torch.nn.Module, cfg: GPTModelConfig, seed: int) -> None:
    """Fill each parameter with its rectangle of :func:`initial_value` of its global tensor."""
    specs = global_param_specs(model)
    for name, param in model.named_parameters():
        spec = specs[name]
        param.view(spec.local_shape).copy_(initial_value(spec, cfg, seed)[spec.slices()])
