"""megatron-core's own GPTModel, saved and loaded with its own ``dist_checkpointing``: the peer's
fixtures for the Megatron-LM interop tests (tests/test_megatron_interop.py). One process, or one
per tensor-parallel rank under torchrun.

    python tests/workers/megatron_fixture_worker.py save gpt|llama OUT_DIR
        OUT_DIR/ckpt: a Megatron-LM save directory (iter_0000007/ and the tracker), written by
        dist_checkpointing.save with the common items Megatron-LM's training adds (args as an
        argparse.Namespace, iteration, checkpoint_version); OUT_DIR/params.pt: every parameter
        as a whole global tensor under our global name; OUT_DIR/logits.pt (one process): the
        logits of the fixed prompt PROMPT.
    python tests/workers/megatron_fixture_worker.py load gpt|llama CKPT_DIR OUT_PT
        a fresh GPTModel (other random values) loaded from the torch_dist directory CKPT_DIR by
        dist_checkpointing.load; OUT_PT: its parameters as params.pt above.

The model is built from megatron-core's own pieces (``GPTModel``, ``get_gpt_layer_local_spec``,
``TransformerConfig``), not from this project's builder; the project lends only its CPU patches
(``models.cpu_compat``: megatron-core's RNG tracker and device queries on a machine without CUDA)
and ``models.param_layout`` to name the parameters globally.
"""

import argparse
import os
import sys
import warnings
import zlib

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SHAPES = {
    "gpt": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=32,
                max_position_embeddings=32, vocab_size=100, make_vocab_size_divisible_by=128,
                position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
                group_query_attention=False, num_query_groups=None, add_bias_linear=True,
                untie_embeddings_and_output_weights=False, norm_epsilon=1e-5, rotary_base=10000, rotary_percent=1.0,
                init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0),
}
SHAPES["llama"] = dict(SHAPES["gpt"], ffn_hidden_size=176, position_embedding_type="rope", normalization="RMSNorm",
                       swiglu=True, group_query_attention=True, num_query_groups=2, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, rotary_base=500000)
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]
ITERATION = 7


def start() -> int:
    """A gloo group over this launch's processes (one without torchrun), megatron-core's model
    parallel state with TP = that many, and the CPU patches. Returns the TP size."""
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from models.megatron_import import import_megatron_core

    import_megatron_core()
    from models.cpu_compat import apply_cpu_compat

    apply_cpu_compat(torch.device("cpu"))
    torch.cuda.synchronize = lambda *args, **kwargs: None  # dist_checkpointing's saver calls it
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tp, 1)
    model_parallel_cuda_manual_seed(1234)
    return tp


def build(kind: str, seed: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = SHAPES[kind]
    config = TransformerConfig(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"], num_attention_heads=s["num_attention_heads"],
        ffn_hidden_size=s["ffn_hidden_size"], hidden_dropout=0.0, attention_dropout=0.0,
        normalization=s["normalization"], layernorm_epsilon=s["norm_epsilon"],
        num_query_groups=s["num_query_groups"] or s["num_attention_heads"], add_bias_linear=s["add_bias_linear"],
        gated_linear_unit=s["swiglu"],
        activation_func=torch.nn.functional.silu if s["swiglu"] else torch.nn.functional.gelu,
        tensor_model_parallel_size=dist.get_world_size(), use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False)
    padded = -(-s["vocab_size"] // (s["make_vocab_size_divisible_by"] * dist.get_world_size())) \
        * s["make_vocab_size_divisible_by"] * dist.get_world_size()
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=s["normalization"]),
                     vocab_size=padded, max_sequence_length=s["max_position_embeddings"],
                     share_embeddings_and_output_weights=not s["untie_embeddings_and_output_weights"],
                     position_embedding_type=s["position_embedding_type"], rotary_base=s["rotary_base"])
    # Distinct values everywhere, norms and biases too, so that a comparison means something: each
    # global tensor drawn from its own name's seed, every rank taking its rectangle (the replicated
    # ones alike on every rank, as in a run; the same values at any TP).
    from models.param_layout import global_param_specs

    with torch.no_grad():
        for name, spec in global_param_specs(model).items():
            generator = torch.Generator().manual_seed(seed * 100003 + zlib.crc32(spec.global_name.encode()))
            whole = torch.randn(spec.global_shape, generator=generator) * 0.5
            param = model.get_parameter(name)
            param.copy_(whole[spec.slices()].reshape(param.shape))
    return model, padded


def global_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a whole global tensor under our global name (on every rank)."""
    from models.param_layout import global_param_specs

    specs = global_param_specs(model)
    mine = [(specs[name].global_name, specs[name].global_shape, specs[name].global_offset,
             p.detach().reshape(specs[name].local_shape).clone()) for name, p in model.named_parameters()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, torch.Tensor] = {}
    for pieces in everyone:
        for name, shape, offset, tensor in pieces:
            whole = out.setdefault(name, torch.zeros(shape, dtype=tensor.dtype))
            whole[tuple(slice(o, o + n) for o, n in zip(offset, tensor.shape))] = tensor
    return out


def save(kind: str, out_dir: str) -> None:
    from megatron.core import dist_checkpointing

    model, padded = build(kind, seed=1)
    s = SHAPES[kind]
    megatron_args = argparse.Namespace(**s, padded_vocab_size=padded, tensor_model_parallel_size=dist.get_world_size(),
                                       pipeline_model_parallel_size=1, iteration=ITERATION, ckpt_format="torch_dist",
                                       params_dtype=torch.float32, bf16=False, fp16=False)
    iteration_dir = os.path.join(out_dir, "ckpt", f"iter_{ITERATION:07d}")
    os.makedirs(iteration_dir, exist_ok=True)
    state = model.sharded_state_dict()
    # Megatron-LM's generate_state_dict adds these; dist_checkpointing puts them in common.pt.
    state.update(args=megatron_args, iteration=ITERATION, checkpoint_version=3.0)
    _results_queue_without_a_process()
    dist_checkpointing.save(state, iteration_dir)
    params = global_params(model)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "ckpt", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))
        torch.save(params, os.path.join(out_dir, "params.pt"))
        if dist.get_world_size() == 1:
            torch.save(logits_of(model, s["vocab_size"]), os.path.join(out_dir, "logits.pt"))


def _results_queue_without_a_process() -> None:
    """dist_checkpointing's writer hands its write results back through a queue of a spawn-context
    ``Manager``: a fresh interpreter that imports this module (torch included, ~3 CPU-s a rank)
    for a queue this synchronous save fills in its own process. A fork-context queue does the
    same without one; the files written do not change (tests/test_megatron_interop.py reads them)."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "not there") is None:  # megatron-core 0.16's module global
        filesystem_async._results_queue = multiprocessing.get_context("fork").Queue()


@torch.no_grad()
def logits_of(model, vocab: int) -> torch.Tensor:
    model.eval()
    tokens = torch.tensor([PROMPT])
    positions = torch.arange(len(PROMPT))[None]
    mask = torch.triu(torch.ones(len(PROMPT), len(PROMPT), dtype=torch.bool), diagonal=1)[None, None]
    return model(tokens, positions, mask)[0, :, :vocab].float()


def load(kind: str, ckpt_dir: str, out_pt: str) -> None:
    from megatron.core import dist_checkpointing

    model, _ = build(kind, seed=99)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    common = {"args", "iteration", "checkpoint_version", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({key: value for key, value in state.items() if key not in common})  # strict otherwise
    params = global_params(model)
    if dist.get_rank() == 0:
        torch.save(params, out_pt)


def main() -> None:
    mode, kind, *paths = sys.argv[1:]
    start()
    if mode == "save":
        save(kind, paths[0])
    else:
        load(kind, paths[0], paths[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's save starts spawn helpers, which import this module again
    main()
