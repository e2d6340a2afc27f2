#!/usr/bin/env bash
# README command 1: set up .venv and train a tiny GPT with TP2 x PP2 x DP2 on 8 processes
# (gloo on CPU, NCCL on GPUs), checkpointing asynchronously every iteration to host memory (L0),
# every 20th to runs/demo/local (L1) and every 50th to runs/demo/ckpt (L2), logging to TensorBoard
# under runs/demo/tensorboard and a Perfetto trace per rank under runs/demo/trace.
# A second run resumes where the first stopped. Extra arguments go to pretrain_gpt.py
# (e.g. --train-iters 500 to train on: --lr-decay-iters is given, so the schedule a resume checks
# stays the same).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nproc=8
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
  if (( gpus < 8 )); then
    echo "> $gpus GPU(s): running TP2 x PP2 x DP2 needs 8; falling back to 8 CPU processes"
    export GPT_FORCE_CPU=1
  fi
fi
exec .venv/bin/torchrun --standalone --nproc-per-node "$nproc" scripts/pretrain_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer \
  --model-size tiny --vocab-size 1024 --mock-data \
  --micro-batch-size 2 --global-batch-size 16 \
  --train-iters 200 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine --lr-decay-iters 200 \
  --weight-decay 0.01 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 \
  --eval-interval 100 --eval-iters 2 --log-interval 10 \
  --save runs/demo/ckpt --load runs/demo/ckpt --async-save --save-interval 1 \
  --ckpt-local-dir runs/demo/local --ckpt-local-interval 20 --ckpt-persistent-interval 50 \
  --save-retain-last 2 --ckpt-local-retain-last 2 \
  --tensorboard-dir runs/demo/tensorboard --trace-dir runs/demo/trace "$@"
