#!/usr/bin/env bash
# Roll a training job back to a past step on every level (later checkpoints are moved aside,
# never deleted), or list every checkpoint:
#   scripts/rollback.sh STEP [--save DIR] [--ckpt-local-dir DIR] [--dry-run] [--branch NAME]
#   scripts/rollback.sh STEP --live --save DIR [--iterations-to-skip N ...] [--lr LR]  (a running job)
#   scripts/rollback.sh --list [--save DIR] [--ckpt-local-dir DIR] [--verify]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[[ -x $python ]] || python=python3
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m checkpointing.recovery.rollback "$@"
