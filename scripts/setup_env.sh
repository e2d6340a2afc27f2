#!/usr/bin/env bash
# Create .venv at the repository root and install the project into it.
# Without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 (an unpinned torch would pull a
# multi-GB CUDA build); with one, pip's default CUDA build is taken and the `gpu` extra added.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "> NVIDIA GPU found: installing CUDA torch and the gpu extra"
  "${pip[@]}" torch
  extras="dev,gpu"
else
  echo "> no NVIDIA GPU: installing the CPU build torch==2.13.0"
  "${pip[@]}" torch==2.13.0
  extras="dev"
fi
"${pip[@]}" -e ".[$extras]"
echo "> .venv ready ($(.venv/bin/python -W ignore -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
