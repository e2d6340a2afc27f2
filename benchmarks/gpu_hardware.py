"""The GPU bench's part c, in a process of its own (``bench_trainer_gpu.py --part hardware``): the
bf16 matmul peak the MFU is measured against, and device-to-host copy rates into pageable,
pinned and CUDA-registered shared memory (the engine's host pool)."""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks.gpu_shapes import MATMUL_N

D2H_BYTES = 2 * 10**9
"""Bytes of each device-to-host copy timed."""


def measure_hardware(json_path: str) -> int:
    """(c) in a process of its own (a CUDA error here must not take the report with it): the bf16
    matmul peak and device-to-host copy rates into three kinds of host memory."""
    import torch

    if not torch.cuda.is_available():
        print("bench_trainer_gpu.py --part hardware needs a CUDA GPU", file=sys.stderr)
        return 2
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # cuBLAS picks its kernel and the clocks ramp up on the first calls
        torch.matmul(a, b)
    trials = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.matmul(a, b)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / 10
        trials.append(2 * MATMUL_N**3 / seconds / 1e12)
    out["matmul_tflops_trials"] = trials
    out["matmul_tflops"] = max(trials)  # the peak: the best of three runs of 10 products
    del a, b
    print(f"bf16 {MATMUL_N}^3 matmul: {', '.join(f'{t:.0f}' for t in trials)} TFLOP/s", flush=True)

    n = D2H_BYTES
    device = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(7)

    def rate(host: torch.Tensor) -> float:
        host.copy_(device, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):
            host.copy_(device, non_blocking=True)
        torch.cuda.synchronize()
        return 3 * n / (time.perf_counter() - started) / 1e9

    rates: dict[str, float] = {}
    pageable = torch.empty(n, dtype=torch.uint8).fill_(0)  # touched: first touch is not a copy cost
    rates["pageable (torch.empty)"] = rate(pageable)
    del pageable
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    rates["pinned (torch.empty(pin_memory=True))"] = rate(pinned)
    del pinned
    # The engine's pool: a /dev/shm file mapped shared, touched, then page-locked with
    # cudaHostRegister (checkpointing/storage/host_pool.py HostSlot, shard_copy.py CudaShardCopier.register).
    path = f"/dev/shm/bench-trainer-gpu-d2h-{os.getpid()}"
    try:
        shm = torch.from_file(path, shared=True, size=n, dtype=torch.uint8)
        shm.fill_(0)
        error = int(torch.cuda.cudart().cudaHostRegister(shm.data_ptr(), n, 0))
        if error != 0:
            out["shm_error"] = f"cudaHostRegister failed with error {error}"
        else:
            try:
                rates["/dev/shm, cudaHostRegister (the engine's pool)"] = rate(shm)
            finally:
                torch.cuda.cudart().cudaHostUnregister(shm.data_ptr())
        del shm
    except (RuntimeError, OSError) as error:
        out["shm_error"] = str(error)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    out["d2h_gbps"] = rates
    for name, gbps in rates.items():
        print(f"device-to-host {n / 1e9:.0f} GB into {name}: {gbps:.1f} GB/s", flush=True)
    with open(json_path, "w") as f:
        json.dump(out, f)
    return 0
