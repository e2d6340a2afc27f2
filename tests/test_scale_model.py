"""The scale simulator's parameter table (``benchmarks.scale_model``) is megatron-core's: the
names in ``named_parameters()`` order, the global specs and the flat spans of the real model
(one process, TP1; ``tests/test_state_layout.py`` checks TP2xPP2 against the trainer's pieces)."""

import pytest
import torch

from models.config import preset_config


@pytest.mark.parametrize("preset, untie", [("tiny", False), ("tiny", True), ("llama-tiny", True)])
def test_simulated_parameters_are_the_models(megatron_state, preset, untie):
    from benchmarks.scale_model import stage_params
    from models.gpt import build_gpt_model
    from models.param_layout import global_param_specs
    from trainer.flat_buffers import FlatParamsAndGrads, layout_spans

    cfg = preset_config(preset, untie_embeddings_and_output_weights=untie)
    model = build_gpt_model(cfg, tensor_parallel=1, pipeline_parallel=1, pre_process=True, post_process=True,
                            device=torch.device("cpu"), attention_backend="local")
    specs = global_param_specs(model)
    simulated = stage_params(cfg, 1, 1, 0, 0)
    assert [p.facts.name for p in simulated] == [name for name, _ in model.named_parameters()]
    assert {p.facts.name: p.spec for p in simulated} == specs
    tp_split = frozenset(n for n, s in specs.items() if s.local_shape != s.global_shape)
    buffers = FlatParamsAndGrads(model, 0, tp_split, shapes={n: s.local_shape for n, s in specs.items()})
    assert layout_spans([p.facts for p in simulated]) == buffers.spans
