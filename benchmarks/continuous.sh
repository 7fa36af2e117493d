#!/usr/bin/env bash
# Continuous batching on GPUs: speed that does not depend on per_device_batch_size, pass@k, and the
# same records on 1 and 2 GPUs. SmolLM2-135M-Instruct in bf16 on 180 varied function prompts
# (benchmarks/prompts.py), brace matching from level 1, max_new_tokens 256.
#   bash benchmarks/continuous.sh OUT_DIR 1     # batch 8 against one batch; pass@k (180 x 20) on one GPU
#   bash benchmarks/continuous.sh OUT_DIR 2     # ... and pass@k on 2 GPUs (DDP), records compared
#   bash benchmarks/continuous.sh OUT_DIR 1 --config configs/tp.yaml   # arguments after N go to every run
# Each run prints its whole-run seconds (WALL, the process), predict seconds (the writer's wall
# clock: setup to end), summed generation seconds and tokens/s.
set -euo pipefail
out=${1:?OUT_DIR}; n=${2:-1}
mkdir -p "$out"
python3 benchmarks/prompts.py "$out/varied.jsonl" --prompts 180
common=(--model.model_name_or_path smollm2-135m-instruct --model.max_new_tokens 256 --model.use_brace_matching true
        --model.brace_matching_start_level 1 --data.data_files "$out/varied.jsonl" --data.text_column_name prompt
        --data.id_column_name task_id --data.mode complete --data.block_size 2048 --trainer.accelerator gpu
        --trainer.precision bf16-true --model.torch_dtype bfloat16 --trainer.enable_progress_bar false
        --overwrite_output_dir true "${@:3}")
source "$(dirname "$0")/runs.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((n - 1)))}
run warmup --data.per_device_batch_size 64 --trainer.devices 1 --model.max_new_tokens 8   # converts the model once
run b8 --data.per_device_batch_size 8 --trainer.devices 1
run b1024 --data.per_device_batch_size 1024 --trainer.devices 1
same b8 b1024
run passk1 --config configs/passk.yaml --trainer.devices 1
if [ "$n" -ge 2 ]; then
  run passk2 --config configs/passk.yaml --trainer.devices 2 --trainer.strategy ddp
  same passk1 passk2
fi
