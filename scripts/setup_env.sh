#!/usr/bin/env bash
# Create .venv at the repository root and install the project into it.
#
#   scripts/setup_env.sh             torch 2.13.0 (the CPU build without an NVIDIA GPU, PyPI's CUDA
#                                    build with one), megatron-core, the dev tools and the `hf` extra
#                                    (transformers, safetensors, tokenizers: the tests use them)
#   scripts/setup_env.sh --with-te   the same, then TransformerEngine (the `gpu` extra), GPU only
#                                    (or GPT_WITH_TE=1)
#
# torch is pinned in both branches: an unpinned torch pulls whatever is newest, and on a machine
# without the local CPU wheel a multi-GB CUDA build. Nothing here depends on TransformerEngine:
# it has no wheel for current torch, so pip builds its extension from source (minutes, a CUDA
# toolkit, network), and no command in README.md or docs/ needs it. It is installed only when asked for, and a
# failed TE install is a warning, not the end of setup.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
TORCH_VERSION=2.13.0
with_te=${GPT_WITH_TE:-0}
for arg in "$@"; do
  case "$arg" in
    --with-te) with_te=1 ;;
    *) echo "setup_env.sh: unknown argument $arg (expected --with-te)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# pip byte-compiles what it installs (~50 s of the set-up here). Not skipped (--no-compile): where
# PYTHONDONTWRITEBYTECODE=1 is set, as on this project's machines, Python never writes a .pyc, and
# every interpreter the suite starts would compile every module it imports (the suite's CPU doubled).
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  echo "> NVIDIA GPU found: installing torch==$TORCH_VERSION (PyPI's CUDA build)"
else
  echo "> no NVIDIA GPU: installing the CPU build torch==$TORCH_VERSION"
fi
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" -e ".[dev,hf]"
if [[ $with_te == 1 ]]; then
  if [[ $gpu == 1 ]]; then
    echo "> installing TransformerEngine (the gpu extra; builds from source where no wheel fits)"
    "${pip[@]}" --no-build-isolation -e ".[dev,hf,gpu]" \
      || echo "> WARNING: TransformerEngine did not install; training runs with --transformer-impl local (the default)"
  else
    echo "> --with-te ignored: TransformerEngine runs only on NVIDIA GPUs"
  fi
fi
echo "> .venv ready ($(.venv/bin/python -W ignore -c 'import torch, megatron.core as m; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu", "megatron-core", m.__version__)'))"
