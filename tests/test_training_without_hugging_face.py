"""Training with ``--tokenizer-type GPT2BPETokenizer`` never imports the Hugging Face libraries:
the trainer reads vocab.json with json alone (checked in a fresh process, whose imported modules
are this code's alone)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tokenization.gpt2_files import write_byte_vocabulary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_training_never_imports_the_hugging_face_libraries(tmp_path):
    """The trainer and its arguments with GPT2BPETokenizer: vocab.json is read with json alone."""
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    write_byte_vocabulary(vocab, merges)
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c{suffix}").write_bytes(b"")
    data = ["--model-size", "tiny", "--data-path", str(tmp_path / "c"), "--train-iters", "1", "--lr", "1"]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import trainer.training, trainer.checkpointer, checkpointing.manager\n"
        "from trainer.arguments import parse_job_config\n"
        "parse_job_config(sys.argv[2:], world_size=1)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'safetensors', 'tokenizers', 'interop')\n"
        "                or m == 'tokenization.bpe')\n"
        "print(loaded); sys.exit(1 if loaded else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), *data, "--tokenizer-type", "GPT2BPETokenizer",
                           "--vocab-file", vocab, "--merge-file", merges], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
