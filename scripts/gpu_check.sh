#!/bin/bash
# The checks that need a GPU, in one go: the engine's CUDA tests (and the CPU engine tests beside
# them) and the GPU benchmark. Run from the repository root on a CUDA machine with torch, xxhash,
# psutil and pytest; logs and the table go to ${OUT:-results/gpu}.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    df -h /dev/shm
} 2>&1 | tee "$OUT/machine.txt"
# The pool lives in /dev/shm; containers often give it 64 MB. Make room when we may.
if [ "$(df --output=avail -k /dev/shm | tail -1)" -lt 12000000 ]; then
    mount -o remount,size=24G /dev/shm 2>&1 | tee -a "$OUT/machine.txt"
    df -h /dev/shm | tee -a "$OUT/machine.txt"
fi
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
timeout 240 "$PY" -m pytest -q -s -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 180 "$PY" scripts/bench_engine_gpu.py --state-gb 3 --iters 20 --rounds 2 --out "$OUT/bench_engine_gpu.md" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
# A shorter forward+backward than the copy: what happens when the copy does not fit.
timeout 150 "$PY" scripts/bench_engine_gpu.py --state-gb 3 --iters 20 --rounds 2 --compute-ms 40 \
    --out "$OUT/bench_engine_gpu_short.md" 2>&1 | tee -a "$OUT/bench.log"
echo "tests rc $tests, bench rc $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
