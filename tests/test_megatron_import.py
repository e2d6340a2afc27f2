"""megatron-core imported with its import-time ``torch.compile`` deferred (``models.megatron_import``):
no TorchInductor at start-up, and a decorated function is compiled, with its options, at its first call."""

import subprocess
import sys

import pytest

from models.megatron_import import DeferredCompile, deferred_compile
from tests.launch import ROOT

pytestmark = pytest.mark.slow  # a fresh interpreter imports megatron-core


def test_each_function_is_compiled_once_at_its_first_call_with_its_options():
    calls = []

    def fake_compile(fn, **options):
        calls.append((fn.__name__, options))
        return lambda *a: ("compiled", fn(*a))

    compile_later = deferred_compile(fake_compile)

    @compile_later
    def add(a, b):
        return a + b

    @compile_later(dynamic=False)
    def mul(a, b):
        return a * b

    assert isinstance(add, DeferredCompile) and add.__name__ == "add" and calls == [], "nothing compiled yet"
    assert add(2, 3) == ("compiled", 5) and add(1, 1) == ("compiled", 2)
    assert mul(2, 3) == ("compiled", 6)
    assert calls == [("add", {}), ("mul", {"dynamic": False})]


def test_importing_megatron_core_loads_no_inductor():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from models.megatron_import import import_megatron_core, DeferredCompile\n"
            "import_megatron_core()\n"
            "from megatron.core.models.gpt import GPTModel\n"
            "import megatron.core.fusions.fused_bias_gelu as gelu, megatron.core.jit as jit, torch\n"
            "assert torch.compile.__module__.startswith('torch'), 'the real torch.compile is back'\n"
            "print('torch._inductor.compile_fx' in sys.modules, isinstance(gelu.bias_gelu, DeferredCompile))\n" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"], out.stdout


def test_preparing_and_reading_data_loads_no_inductor(tmp_path):
    """``scripts/prepare_data.py`` and the dataset reader import megatron-core's indexed dataset
    with the same deferral (its plain import costs ~3 CPU-s more, Inductor included)."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from types import SimpleNamespace\n"
            "from trainer.prepare import build_indexed_dataset\n"
            "from trainer.data import IndexedGPTDataset\n"
            "tok = SimpleNamespace(vocab_size=256, eod=0, tokenize=lambda text: list(text.encode()))\n"
            "build_indexed_dataset(['some text to read back' * 20], tok, %r)\n"
            "data = IndexedGPTDataset(%r, 16, 1, 'train', (1.0, 0.0, 0.0))\n"
            "print('torch._inductor.compile_fx' in sys.modules, data.sample(0).shape[0])\n"
            % (str(ROOT), str(tmp_path / "d"), str(tmp_path / "d")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "17"], out.stdout
