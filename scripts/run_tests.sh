#!/usr/bin/env bash
# README command 2: set up .venv and run the test suite (unit, multi-process gloo, end-to-end).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup_env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# Debian 12's python3.11 (3.11.2) pickles enum members otherwise than the venv's Python: where it
# differs, a full run (no arguments) runs the format and load tests under it too, with the venv's packages.
system_python=/usr/bin/python3.11
if [[ $# -eq 0 && -x $system_python ]] && [[ $($system_python -V 2>&1) != $(.venv/bin/python -V 2>&1) ]]; then
  echo "> the format and load tests under $($system_python -V 2>&1) ($system_python)"
  PYTHONPATH="$root/.venv/lib/python3.11/site-packages" "$system_python" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_private_files.py tests/test_save_plan.py tests/test_chunk_decode.py tests/test_durable.py \
    tests/test_load_policy.py tests/test_direct_io.py
fi
# The lint rules of pyproject.toml ([tool.ruff]) first: seconds, and they fail before the tests run.
.venv/bin/ruff check .
# --durations: CI's log shows where the suite's time goes (it must stay well inside CI's limit).
# Two workers (pytest-xdist), each test file whole on one (its module fixtures made once): the
# multi-process tests leave a core idle much of the time. `-n 0` after this runs in one process.
exec .venv/bin/python -m pytest -q --durations=25 -n "${GPT_TEST_WORKERS:-2}" --dist loadfile "$@"
