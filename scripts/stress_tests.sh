#!/usr/bin/env bash
# Run the test suite (or part of it) beside N busy processes, as on a shared machine: a test that
# depends on timing fails here first.
#
#   scripts/stress_tests.sh 1                       # the whole suite beside one busy process
#   scripts/stress_tests.sh 2 tests/test_engine.py  # one file beside two
#   scripts/stress_tests.sh 1 -m "not slow"         # the unit tier
#
# Each busy process is a Python loop that never sleeps (one core's worth of load); they are
# killed when the tests end, also on Ctrl-C. Arguments after N go to pytest (scripts/run_tests.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: scripts/stress_tests.sh N [pytest arguments...]   (N busy processes beside the tests)" >&2
    exit 2
fi
busy=$1
shift
python=${PYTHON:-python3}
pids=()
stop_busy() { [[ ${#pids[@]} -eq 0 ]] || kill "${pids[@]}" 2>/dev/null || true; }
trap stop_busy EXIT INT TERM
for ((i = 0; i < busy; i++)); do
    "$python" -c 'while True: pass' &
    pids+=($!)
done
echo "> $busy busy process(es) beside the tests (pids ${pids[*]:-none})"
started=$SECONDS
rc=0
scripts/run_tests.sh "$@" || rc=$?
echo "> stress_tests.sh: $busy busy process(es), pytest rc $rc, $((SECONDS - started)) s"
exit $rc
