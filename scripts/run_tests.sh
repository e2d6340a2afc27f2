#!/usr/bin/env bash
# README command 2: set up .venv and run the test suite (unit, multi-process gloo, end-to-end).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup_env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# --durations: CI's log shows where the suite's time goes (it must stay well inside CI's limit).
exec .venv/bin/python -m pytest -q --durations=25 "$@"
