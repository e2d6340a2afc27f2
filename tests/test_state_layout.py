"""Optimizer state pieces and model parameters of every rank tile the global tensors exactly.

This is what makes the checkpoint format reshardable: every element of every global parameter
tensor is written by exactly one rank, and its value is the layout-independent initial value.
"""

import pytest
import torch

from models.config import GPTModelConfig
from models.gpt import initial_value
from models.param_layout import GlobalParamSpec
from tests.launch import ROOT, TINY, run_pretrain

pytestmark = pytest.mark.slow

WORKER = ROOT / "tests" / "workers" / "state_layout_worker.py"
MODEL = GPTModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       seq_length=32, max_position_embeddings=32, vocab_size=1024)
ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--train-iters", "1", "--lr", "1e-3", "--seed", "5",
               "--micro-batch-size", "1", "--optimizer-shard-size-mb", "0.02"]


def assemble(entries, key_offset, key_values):
    """{name: (tensor, coverage count)} from rectangles."""
    tensors, counts = {}, {}
    for e in entries:
        name = e["global_name"]
        if name not in tensors:
            tensors[name] = torch.zeros(e["global_shape"])
            counts[name] = torch.zeros(e["global_shape"], dtype=torch.int32)
        index = tuple(slice(o, o + s) for o, s in zip(e[key_offset], e[key_values].shape))
        tensors[name][index] = e[key_values]
        counts[name][index] += 1
    return tensors, counts


@pytest.mark.parametrize("nproc, layout", [
    (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]),
    (2, []),  # DP2 with a replicated optimizer: only DP rank 0 writes
])
def test_every_element_is_written_once_with_its_global_value(nproc, layout, tmp_path):
    run_pretrain([str(tmp_path), *ARGS, *layout], nproc=nproc, script=WORKER)
    dumps = [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]
    assert max(d["num_shards"] for d in dumps) > 3, "small shards must cut parameters into pieces"
    writers = [p for d in dumps for p in d["pieces"] if p["is_writer"]]
    state, state_count = assemble(writers, "global_offset", "values")
    main_params = [p for d in dumps for p in d["params"] if p["is_main"]]
    params, param_count = assemble(main_params, "global_offset", "values")
    assert set(state) == set(params)
    for name in state:
        assert torch.all(state_count[name] == 1), f"{name}: optimizer-state elements written {state_count[name].unique()} times"
        assert torch.all(param_count[name] == 1), f"{name}: parameter elements written {param_count[name].unique()} times"
        spec = GlobalParamSpec(name, tuple(state[name].shape), (0,) * state[name].dim(), tuple(state[name].shape), (0,))
        expected = initial_value(spec, MODEL, seed=5)
        assert torch.equal(state[name], expected), name
        assert torch.equal(params[name], expected), name
    assert len(state) == 4 * 12 + 4  # 12 tensors per layer, 2 embeddings, final norm weight and bias
    # The scale simulator (benchmarks.scale) cuts exactly these pieces, rank by rank, without the model
    from benchmarks.scale import Layout, Simulated

    tp = int(layout[layout.index("--tensor-model-parallel-size") + 1]) if layout else 1
    pp = int(layout[layout.index("--pipeline-model-parallel-size") + 1]) if layout else 1
    sim = Simulated(MODEL, Layout(tp, pp, nproc // (tp * pp)), 0.02, bf16=False,
                    distributed_optimizer="--use-distributed-optimizer" in layout)
    for rank, dump in enumerate(dumps):
        simulated = [(p.key, p.global_shape, p.global_offset, p.shape, p.is_writer) for p in sim.optimizer_pieces(rank)]
        real = [(p["global_name"], tuple(p["global_shape"]), tuple(p["global_offset"]), tuple(p["values"].shape),
                 p["is_writer"]) for p in dump["pieces"]]
        assert simulated == real, f"rank {rank}: the simulator's pieces differ from the trainer's"
