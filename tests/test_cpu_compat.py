"""Each patch of models/cpu_compat.py, and that nothing is patched for a CUDA run."""

import pytest
import torch

from models import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")


CPU = torch.device("cpu")


def test_nothing_is_patched_for_a_cuda_run(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    before = torch.cuda.current_device
    assert cpu_compat.apply_cpu_compat(torch.device("cuda", 0)) is False
    assert torch.cuda.current_device is before


def test_current_device_is_cpu():
    cpu_compat.apply_cpu_compat(CPU)
    assert torch.cuda.current_device() == torch.device("cpu")
    # The pattern megatron-core uses to allocate:
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_rng_tracker_forks_reproducibly_and_restores_the_default_generator():
    cpu_compat.apply_cpu_compat(CPU)
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tp_random.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    torch.manual_seed(0)
    default_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), default_before), "fork must restore the default generator"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "a fork must continue the named stream, not restart it"
    tp_random.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with tp_random.get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    assert torch.equal(first, again), "the same seed must give the same stream"
    with pytest.raises(ValueError, match="already"):
        tracker.add("model-parallel-rng", 999)


def test_setup_embeddings_skips_the_cuda_move_and_restores_tensor_cuda():
    cpu_compat.apply_cpu_compat(CPU)
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert getattr(LanguageModule.setup_embeddings_and_output_layer, "__cpu_compat__", False)
    seen = {}

    def fake_setup(self):
        t = torch.ones(2)
        seen["moved"] = t.cuda()
        return "done"

    wrapped = cpu_compat._skip_cuda_move(fake_setup)
    original = torch.Tensor.cuda
    assert wrapped(None) == "done"
    assert seen["moved"].device.type == "cpu"
    assert torch.Tensor.cuda is original
