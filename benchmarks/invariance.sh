#!/usr/bin/env bash
# Batch-invariant decoding on a GPU: records that do not depend on the batch, and what the mode costs.
# SmolLM2-135M-Instruct in bf16 on 180 varied function prompts (benchmarks/prompts.py), brace
# matching from level 1, max_new_tokens 256; greedy at per_device_batch_size 8 and 1024, then
# sampled (configs/passk.yaml: 20 samples, T 0.8, top-p 0.95) at 8 and 180. Each pair runs with
# model.batch_invariant off and on.
#   bash benchmarks/invariance.sh OUT_DIR
# Prints each run's seconds and, per pair, how many records agree (benchmarks/runs.sh).
set -euo pipefail
out=${1:?OUT_DIR}
mkdir -p "$out"
here=$(dirname "$0")
python3 "$here/prompts.py" "$out/varied.jsonl" --prompts 180
common=(--model.model_name_or_path smollm2-135m-instruct --model.max_new_tokens 256 --model.use_brace_matching true
        --model.brace_matching_start_level 1 --data.data_files "$out/varied.jsonl" --data.text_column_name prompt
        --data.id_column_name task_id --data.mode complete --data.block_size 2048 --trainer.accelerator gpu
        --trainer.precision bf16-true --model.torch_dtype bfloat16 --trainer.enable_progress_bar false
        --trainer.devices 1 --overwrite_output_dir true)
source "$here/runs.sh"
run warmup --data.per_device_batch_size 64 --model.max_new_tokens 8   # converts the model once
for mode in false true; do
  tag=$([ $mode = true ] && echo inv || echo off)
  run "$tag-b8" --data.per_device_batch_size 8 --model.batch_invariant $mode
  run "$tag-b1024" --data.per_device_batch_size 1024 --model.batch_invariant $mode
  same "$tag-b8" "$tag-b1024"
done
for mode in false true; do
  tag=$([ $mode = true ] && echo inv || echo off)
  run "$tag-passk-b8" --config configs/passk.yaml --data.per_device_batch_size 8 --model.batch_invariant $mode
  run "$tag-passk-b180" --config configs/passk.yaml --data.per_device_batch_size 180 --model.batch_invariant $mode
  same "$tag-passk-b8" "$tag-passk-b180"
done
