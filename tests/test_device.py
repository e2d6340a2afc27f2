"""What breaks first on a GPU machine, checked on the CPU with CUDA's answers faked:
the device is chosen in one place (``GPT_FORCE_CPU`` included), more ranks than GPUs is refused
before any group exists, the telemetry never gathers on NCCL, fusions only where their kernels
work, RNG states across devices, and a setup that never depends on TransformerEngine."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from models import cpu_compat
from models.fusions import KernelFusions, resolve_fusions
from trainer.device import DeviceContext, DeviceError, cuda_selected, select_device

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs; records set_device calls."""
    calls: list = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
        return calls

    return install


def test_forced_cpu_on_a_gpu_machine_is_the_cpu_path_everywhere(gpus, monkeypatch):
    gpus(4)
    environ = {"GPT_FORCE_CPU": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}
    assert not cuda_selected(environ=environ)
    ctx = select_device(environ=environ)
    assert ctx == DeviceContext(torch.device("cpu"), "gloo")
    # The model's compatibility patches follow the chosen device, not torch.cuda.is_available():
    # before, a GPU machine forced to the CPU built the model unpatched (device mismatch).
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "current_device", torch.cuda.current_device)  # undone after the test
    assert cpu_compat.apply_cpu_compat(ctx.device) is True
    assert torch.cuda.current_device() == torch.device("cpu")


def test_one_gpu_per_rank(gpus):
    calls = gpus(2)
    ctx = select_device(environ={"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert ctx == DeviceContext(torch.device("cuda", 1), "nccl")
    assert calls == [torch.device("cuda", 1)]


@pytest.mark.parametrize("local_rank", [0, 2])
def test_more_ranks_than_gpus_is_refused_before_anything_is_touched(gpus, local_rank):
    calls = gpus(2)
    with pytest.raises(DeviceError, match=r"3 processes on this node but 2 GPU\(s\).*--nproc-per-node 2.*GPT_FORCE_CPU=1"):
        select_device(environ={"LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": "3"})
    assert calls == [], "no GPU may be selected before the refusal"


def test_pretrain_gpt_reports_the_device_error_without_a_traceback(tmp_path):
    # A real process: GPT_FORCE_CPU unset, torch sees no GPU here, so fake one in sitecustomize.
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "GPT_FORCE_CPU"}
    env.update(PYTHONPATH=f"{tmp_path}:{ROOT}", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", RANK="1", WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/pretrain_gpt.py"), "--model-size", "tiny", "--mock-data",
                           "--vocab-size", "128", "--train-iters", "1", "--lr", "1e-3"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "2 processes on this node but 1 GPU(s)" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- fused kernels ------------------------------------------------------------------------------

def test_no_fusion_on_cpu():
    resolved = resolve_fusions(KernelFusions(bias_gelu=True), torch.device("cpu"))
    assert resolved.transformer_config_kwargs() == dict.fromkeys(
        ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion"), False)
    assert any("bias-gelu" in r for r in resolved.refused)


def test_on_cuda_the_default_model_is_the_same_function(monkeypatch):
    """megatron's fused bias-GELU is the tanh approximation: never on unless asked for. The
    softmax fusion only when Apex's kernels import (they do not here, nor on the lent GPUs)."""
    from models import fusions

    monkeypatch.setattr(fusions, "torch_compile_status", lambda device_type: None)
    resolved = resolve_fusions(KernelFusions(), CUDA0)
    assert resolved.bias_activation_fusion is False
    assert resolved.bias_dropout_fusion is True
    assert resolved.masked_softmax_fusion is False
    assert any("scaled_masked_softmax_cuda" in r for r in resolved.refused)
    assert resolve_fusions(KernelFusions(bias_gelu=True), CUDA0).bias_activation_fusion is True
    off = resolve_fusions(KernelFusions(bias_dropout=False, masked_softmax=False), CUDA0)
    assert off.refused == () and not any(off.transformer_config_kwargs().values())


def test_compiled_fusions_fall_back_when_torch_compile_fails(monkeypatch):
    from models import fusions

    monkeypatch.setattr(fusions, "torch_compile_status", lambda device_type: "torch.compile does not work here (x)")
    resolved = resolve_fusions(KernelFusions(bias_gelu=True), CUDA0)
    assert not resolved.bias_activation_fusion and not resolved.bias_dropout_fusion
    assert sum("torch.compile does not work" in r for r in resolved.refused) == 2


def test_the_softmax_flag_as_resolved_runs_a_bf16_attention_softmax():
    """The shapes and dtype with which megatron-core calls Apex's kernel when the flag is on: with
    the flag as resolved for a GPU without Apex, the torch softmax runs instead."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    flag = resolve_fusions(KernelFusions(), CUDA0).masked_softmax_fusion
    softmax = FusedScaleMaskSoftmax(input_in_fp16=False, input_in_bf16=True, attn_mask_type=AttnMaskType.causal,
                                    scaled_masked_softmax_fusion=flag, mask_func=attention_mask_func,
                                    softmax_in_fp32=True, scale=None)
    scores = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    mask = torch.triu(torch.ones(1, 1, 64, 64, dtype=torch.bool), diagonal=1)
    probs = softmax(scores, mask)
    assert torch.allclose(probs.float().sum(-1), torch.ones(2, 4, 64), atol=1e-2)
    on = FusedScaleMaskSoftmax(False, True, AttnMaskType.causal, True, attention_mask_func, True, None)
    with pytest.raises(ModuleNotFoundError, match="scaled_masked_softmax_cuda"):
        on(scores, mask)  # what the first bf16 forward on a GPU did before


def test_fusion_flags_parse():
    from trainer.arguments import parse_job_config

    base = ["--model-size", "tiny", "--mock-data", "--vocab-size", "128", "--train-iters", "1", "--lr", "1e-3"]
    assert parse_job_config(base, world_size=1).training.fusions == KernelFusions()
    job = parse_job_config(base + ["--bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion"],
                           world_size=1)
    assert job.training.fusions == KernelFusions(bias_gelu=True, bias_dropout=False, masked_softmax=False)
    assert parse_job_config(base + ["--no-bias-gelu-fusion"], world_size=1).training.fusions.bias_gelu is False


# -- telemetry ----------------------------------------------------------------------------------

def test_telemetry_refuses_a_group_that_is_not_gloo(monkeypatch):
    from trainer import checkpoint_telemetry

    with pytest.raises(ValueError, match="gloo group of its own"):
        checkpoint_telemetry.CheckpointTelemetry(engine=None, writer=None, group=None)
    monkeypatch.setattr(checkpoint_telemetry.dist, "get_backend", lambda group: "nccl")
    with pytest.raises(ValueError, match="got nccl"):
        checkpoint_telemetry.CheckpointTelemetry(engine=None, writer=None, group=object())


# -- RNG states across devices ------------------------------------------------------------------

def _state_on(device_type: str):
    from trainer.checkpoint_state import TrainerCheckpointState

    state = TrainerCheckpointState.__new__(TrainerCheckpointState)
    state.rank = 0
    set_states: list = []
    ctx = types.SimpleNamespace(device=torch.device(device_type), set_rng_state=lambda s: set_states.append(s))
    state.trainer = types.SimpleNamespace(device_ctx=ctx)
    return state, set_states


def _rng(device_type: str, device_state):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "device": device_state, "device_type": device_type,
            "tracker": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}


def test_rng_states_from_another_device_are_not_fed_to_this_one(monkeypatch):
    from megatron.core.tensor_parallel import random as tp_random

    tracker_calls: list = []
    monkeypatch.setattr(tp_random, "get_cuda_rng_tracker",
                        lambda: types.SimpleNamespace(set_states=lambda s: tracker_calls.append(s)))
    state, device_calls = _state_on("cpu")
    note = state._restore_rng(_rng("cuda", torch.zeros(16, dtype=torch.uint8)))
    assert note is not None and "written on cuda, this run is on cpu" in note
    # scripts/bench_trainer_gpu.py looks for this phrase in the GPU run's log.
    assert "RNG states (device generator, tensor-parallel tracker) were not restored" in note
    assert device_calls == [] and tracker_calls == []
    # A checkpoint written before the device was recorded: a CPU run stored no device state.
    old = _rng("cpu", None)
    del old["device_type"]
    state, device_calls = _state_on("cuda")
    assert "written on cpu" in state._restore_rng(old)
    state, device_calls = _state_on("cpu")
    assert state._restore_rng(_rng("cpu", None)) is None
    assert device_calls == [None] and len(tracker_calls) == 1


# -- setup ---------------------------------------------------------------------------------------

def _fake_setup(tmp_path: Path, gpu: bool, *args: str) -> list[str]:
    """Run scripts/setup_env.sh against a fake venv python that records its pip commands."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/setup_env.sh").write_text((ROOT / "scripts/setup_env.sh").read_text())
    log = tmp_path / "pip.log"
    bin_dir = tmp_path / ".venv/bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path = tmp_path / "path"
    path.mkdir()
    smi = path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n" if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{path}:{os.environ['PATH']}")
    env.pop("GPT_WITH_TE", None)
    proc = subprocess.run(["bash", str(tmp_path / "scripts/setup_env.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip")]


@pytest.mark.parametrize("gpu", [False, True])
def test_setup_pins_torch_and_never_needs_transformer_engine(tmp_path, gpu):
    installs = _fake_setup(tmp_path, gpu)
    torch_installs = [line for line in installs if " torch" in line]
    assert torch_installs and all("torch==2.13.0" in line for line in torch_installs), installs
    assert not any("gpu" in line for line in installs), installs


def test_setup_installs_transformer_engine_only_when_asked(tmp_path):
    installs = _fake_setup(tmp_path, True, "--with-te")
    assert any(".[dev,hf,gpu]" in line for line in installs), installs


def test_peak_device_memory_is_none_on_cpu():
    assert DeviceContext(torch.device("cpu"), "gloo").peak_memory_mib() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
def test_peak_device_memory_covers_what_was_allocated_on_cuda():
    ctx = select_device()
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device=ctx.device)  # 256 MiB
    assert ctx.peak_memory_mib() >= 256 and held.numel()
