#!/usr/bin/env bash
# Tensor-parallel speed on one node: the same job on one GPU and on N GPUs (configs/tp.yaml), then
# one decode step's time at each degree (benchmarks/tp_step.py). A random-weight model of
# benchmarks/random_model.py (SHAPE, default llama-8b; built into OUT_DIR/model once), bf16,
# PROMPTS function prompts (default 512) x NEW new tokens (default 256), greedy, no early stop.
#   bash benchmarks/tensor_parallel.sh OUT_DIR 2
#   SHAPE=llama-34b ONE=skip bash benchmarks/tensor_parallel.sh OUT_DIR 2   # a model one GPU cannot hold
# Prints RUN lines (tokens/s; benchmarks/runs.sh), SAME (records of one GPU against N) and STEP lines.
set -euo pipefail
out=${1:?OUT_DIR}; n=${2:-2}
mkdir -p "$out"
here=$(dirname "$0")
source "$here/runs.sh"
random_job "${PROMPTS:-512}" "${NEW:-256}" gpu --data.block_size 2048
if [ "${ONE:-run}" != skip ]; then
  CUDA_VISIBLE_DEVICES=0 run one --trainer.devices 1
fi
run "tp$n" --config configs/tp.yaml --trainer.devices "$n"
[ "${ONE:-run}" != skip ] && same one "tp$n"
[ "${ONE:-run}" != skip ] && CUDA_VISIBLE_DEVICES=0 python3 "$here/tp_step.py" "$model" --batch 64 256 | grep -v Loading
torchrun --nproc_per_node "$n" "$here/tp_step.py" "$model" --batch 64 256 | grep -v Loading
