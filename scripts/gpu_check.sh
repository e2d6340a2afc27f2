#!/bin/bash
# The checks that need a GPU, in one go, on a CUDA machine with python3, torch, xxhash, psutil and
# pytest (megatron-core comes from .whl/: run scripts/gpu_fetch_wheels.sh first, where PyPI is):
#
#   1. install .whl/*.whl into /tmp/site (no network, no dependencies) and put it on PYTHONPATH
#   2. the engine's CUDA tests and the CPU engine tests beside them (pytest)
#   3. the trainer on the GPU: scripts/bench_trainer_gpu.py (CPU/GPU losses, 350M throughput and
#      MFU with and without the checkpoint engine, device-to-host bandwidth, 1.3B, then while its
#      budget lasts llama3-1B with and without the engine: tokens/s, MFU, peak GPU memory)
#   4. only with GPU_CHECK_ENGINE_BENCH=1: scripts/bench_engine_gpu.py twice (~5 more minutes)
#
# Every step runs whatever the previous ones did; each has its own timeout; the last line gives
# each step's exit code. Logs and reports go to ${OUT:-results/gpu}, at most 8 files:
# machine.txt gpu_tests.log bench_trainer.log bench_trainer_gpu.md rc.txt
# [bench_engine.log bench_engine_gpu.md bench_engine_gpu_short.md]. About 5 minutes on an H200.
#
#   scripts/gpu_check.sh             # on the GPU machine, from the repository root
#   scripts/gpu_check.sh --dry-run   # here, on a CPU: every file it needs, every command parsed
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dry_run=0
case "${1:-}" in
    "") ;;
    --dry-run) dry_run=1 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ "$dry_run" -eq 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python  # here the project's venv has torch and megatron-core
fi
shopt -s nullglob
wheels=(.whl/*.whl)
OUT_FILES="machine.txt gpu_tests.log bench_trainer.log bench_trainer_gpu.md rc.txt"
[ "${GPU_CHECK_ENGINE_BENCH:-0}" = 1 ] && OUT_FILES="$OUT_FILES bench_engine.log bench_engine_gpu.md bench_engine_gpu_short.md"

if [ "$dry_run" -eq 1 ]; then
    missing=0
    for f in tests/test_engine_cuda.py tests/test_engine.py tests/conftest.py scripts/bench_engine_gpu.py \
             scripts/bench_trainer_gpu.py scripts/pretrain_gpt.py; do
        [ -f "$f" ] || { echo "gpu_check.sh --dry-run: missing $f" >&2; missing=1; }
    done
    n=$(echo $OUT_FILES | wc -w)
    echo "> files to \$OUT ($n, at most 8 come back): $OUT_FILES"
    [ "$n" -le 8 ] || { echo "gpu_check.sh --dry-run: $n files to \$OUT, only 8 come back" >&2; missing=1; }
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "> WARNING: no .whl/*.whl: the GPU machine has no megatron-core, so every trainer run there would fail;" \
             "run scripts/gpu_fetch_wheels.sh, and carry .whl (git-ignored) to the GPU machine"
    else
        echo "> wheels to install there: ${wheels[*]} (git-ignored: carry .whl to the GPU machine)"
    fi
    "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine.py >/tmp/gpu_check_collect.$$ 2>&1
    collect=$?
    tail -1 /tmp/gpu_check_collect.$$; [ "$collect" -eq 0 ] || cat /tmp/gpu_check_collect.$$
    rm -f /tmp/gpu_check_collect.$$
    "$PY" scripts/bench_engine_gpu.py --help >/dev/null
    engine_help=$?
    "$PY" scripts/bench_trainer_gpu.py --dry-run
    bench=$?
    echo "gpu_check.sh --dry-run: files $([ $missing -eq 0 ] && echo ok || echo MISSING), pytest collection rc $collect," \
         "bench_engine_gpu.py --help rc $engine_help, bench_trainer_gpu.py --dry-run rc $bench"
    [ "$missing" -eq 0 ] && [ "$collect" -eq 0 ] && [ "$engine_help" -eq 0 ] && [ "$bench" -eq 0 ]
    exit
fi

OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
started=$SECONDS
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    df -h /dev/shm /tmp
} 2>&1 | tee "$OUT/machine.txt"
# The engine's pool lives in /dev/shm (the 350M run holds 3 versions of ~5 GB, llama3-1B 2 of
# ~17 GB); containers often give it 64 MB. Make room when we may.
if [ "$(df --output=avail -k /dev/shm | tail -1)" -lt 40000000 ]; then
    mount -o remount,size=48G /dev/shm 2>&1 | tee -a "$OUT/machine.txt"
    df -h /dev/shm | tee -a "$OUT/machine.txt"
fi
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1

# 1. megatron-core from the wheel (the machine has no network).
install=skipped
if [ ${#wheels[@]} -gt 0 ]; then
    {
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
        rc=$?
        if [ $rc -ne 0 ]; then
            # No pip there: a wheel is a zip whose top level is the import path.
            echo "pip install failed (rc $rc): unpacking the wheels instead"
            "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' "${wheels[@]}"
            rc=$?
        fi
        exit $rc
    } 2>&1 | tee -a "$OUT/machine.txt"
    install=${PIPESTATUS[0]}
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/*.whl: megatron-core must already be installed (scripts/gpu_fetch_wheels.sh fetches it)" | tee -a "$OUT/machine.txt"
fi
"$PY" -W ignore -c 'import megatron.core as m; print("megatron-core", m.__version__, "from", m.__file__)' 2>&1 | tee -a "$OUT/machine.txt"

# 2. The engine's CUDA tests (~25 s).
timeout -k 10 120 "$PY" -m pytest -q -s -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine.py tests/test_engine_zero_copy.py tests/test_optimizer.py tests/test_attention.py tests/test_device.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}

# 3. The trainer on the GPU (~4 minutes; the bench skips what no longer fits in its budget, the
# llama3-1B pair, last, first). GPU_CHECK_TRAINER_ARGS: more arguments (--no-1p3b, --no-llama;
# --smoke rehearses this script on a CPU). GPU_CHECK_BUDGET_S: the bench's budget (default 270 s;
# ~420 leaves room for the whole llama3-1B pair after everything else).
budget_s=${GPU_CHECK_BUDGET_S:-270}
timeout -k 20 $((budget_s + 30)) "$PY" scripts/bench_trainer_gpu.py --budget-s "$budget_s" --out "$OUT/bench_trainer_gpu.md" \
    ${GPU_CHECK_TRAINER_ARGS:-} 2>&1 | tee "$OUT/bench_trainer.log"
trainer=${PIPESTATUS[0]}

# 4. The engine on a synthetic state (optional: the trainer bench measures the engine in place).
bench=skipped
bench_short=skipped
if [ "${GPU_CHECK_ENGINE_BENCH:-0}" = 1 ]; then
    timeout 180 "$PY" scripts/bench_engine_gpu.py --state-gb 3 --iters 20 --rounds 2 --out "$OUT/bench_engine_gpu.md" 2>&1 | tee "$OUT/bench_engine.log"
    bench=${PIPESTATUS[0]}
    # A shorter forward+backward than the copy: what happens when the copy does not fit.
    timeout 150 "$PY" scripts/bench_engine_gpu.py --state-gb 3 --iters 20 --rounds 2 --compute-ms 40 \
        --out "$OUT/bench_engine_gpu_short.md" 2>&1 | tee -a "$OUT/bench_engine.log"
    bench_short=${PIPESTATUS[0]}
fi
summary="gpu_check.sh rc: install $install, tests $tests, trainer bench $trainer, engine bench $bench, engine bench short $bench_short ($((SECONDS - started)) s)"
echo "$summary" | tee "$OUT/rc.txt"
for rc in $install $tests $trainer $bench $bench_short; do
    [ "$rc" = skipped ] || [ "$rc" -eq 0 ] || exit 1
done
