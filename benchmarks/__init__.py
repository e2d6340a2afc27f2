"""The benchmarks' library: child processes with time limits, ``/proc`` CPU accounting, the
checkpointing methods the CPU bench compares, the trainer runs and report of the GPU bench, and
the fault trials. ``scripts/bench_checkpoint.py``, ``scripts/bench_trainer_gpu.py`` and
``scripts/fault_trials.py`` are their command lines. Nothing in training imports it."""
