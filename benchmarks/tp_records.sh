#!/usr/bin/env bash
# Tensor-parallel records against one process in bf16, with model.batch_invariant off and on: how
# many records agree between batch sizes (8 and 64) on one process, between them on N tensor-parallel
# ranks, and between one process and N ranks. A random-weight model of benchmarks/random_model.py
# (SHAPE, default llama-8b; built into OUT_DIR/model once), PROMPTS function prompts
# (benchmarks/prompts.py, default 180), NEW new tokens (default 128), greedy.
#   bash benchmarks/tp_records.sh OUT_DIR 2                                   # 2 GPUs
#   SHAPE=llama-small PROMPTS=24 NEW=32 bash benchmarks/tp_records.sh OUT_DIR 2 cpu   # CPU processes (gloo)
set -euo pipefail
out=${1:?OUT_DIR}; n=${2:-2}; accel=${3:-gpu}
mkdir -p "$out"
here=$(dirname "$0")
[ "$accel" = cpu ] && export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
source "$here/runs.sh"
random_job "${PROMPTS:-180}" "${NEW:-128}" "$accel"
tp=(--config configs/tp.yaml --trainer.devices "$n")
for mode in false true; do
  tag=$([ $mode = true ] && echo inv || echo off)
  for b in 8 64; do
    run "$tag-one-b$b" --trainer.devices 1 --data.per_device_batch_size $b --model.batch_invariant $mode
    run "$tag-tp$n-b$b" "${tp[@]}" --data.per_device_batch_size $b --model.batch_invariant $mode
  done
  same "$tag-one-b8" "$tag-one-b64"
  same "$tag-tp$n-b8" "$tag-tp$n-b64"
  same "$tag-one-b8" "$tag-tp$n-b8"
done
