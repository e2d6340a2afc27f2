#!/usr/bin/env bash
# README command 2: set up .venv and run the test suite (unit, multi-process gloo, end-to-end).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup_env.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# Debian 12's python3.11 (3.11.2) pickles enum members otherwise than the venv's Python: where it
# differs, a full run (no arguments) runs the format and load tests under it too, with the venv's packages.
# That pass runs beside the main one (the suite leaves a core idle much of the time); its output
# follows the main run's, and either failing fails the command.
system_python=/usr/bin/python3.11
beside=""
if [[ $# -eq 0 && -x $system_python ]] && [[ $($system_python -V 2>&1) != $(.venv/bin/python -V 2>&1) ]]; then
  beside=$(mktemp -d)
  echo "> the format and load tests under $($system_python -V 2>&1) ($system_python), beside the main run"
  (
    rc=0
    PYTHONPATH="$root/.venv/lib/python3.11/site-packages" "$system_python" -m pytest -q -p no:cacheprovider --basetemp "$beside/tmp" \
      -m "not slow" tests/test_private_files.py tests/test_save_plan.py tests/test_chunk_decode.py \
      tests/test_durable.py tests/test_load_policy.py tests/test_direct_io.py >"$beside/log" 2>&1 || rc=$?
    echo "$rc" >"$beside/rc"
  ) &
  beside_pid=$!
  trap 'kill "$beside_pid" 2>/dev/null || true; rm -rf "$beside"' EXIT
fi
# The lint rules of pyproject.toml ([tool.ruff]) first: seconds, and they fail before the tests run.
.venv/bin/ruff check .
# --durations: CI's log shows where the suite's time goes (it must stay well inside CI's limit).
# Two workers (pytest-xdist), each test file whole on one (its module fixtures made once): the
# multi-process tests leave a core idle much of the time. `-n 0` after this runs in one process.
# xdist hands out the files with the most tests first. Longest first instead (--no-loadscope-reorder
# and a sort) was slower in the one clean-clone run that tried it (pytest 797 s, against 730-753 s):
# the long multi-process files then all ran at once at the start.
rc=0
.venv/bin/python -m pytest -q --durations=25 -n "${GPT_TEST_WORKERS:-2}" --dist loadfile "$@" || rc=$?
if [[ -n $beside ]]; then
  wait "$beside_pid" || true
  echo "> the format and load tests under $($system_python -V 2>&1) ($system_python):"
  cat "$beside/log"
  beside_rc=$(cat "$beside/rc" 2>/dev/null || echo 1)
  [[ $rc -ne 0 ]] || rc=$beside_rc
fi
exit "$rc"
