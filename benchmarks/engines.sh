#!/usr/bin/env bash
# The engines on one GPU, on the same job: the compact engine (continuous batching, CUDA graphs) and
# model.generate, for a dense and a mixture-of-experts shape (random weights, bf16, benchmarks/random_model.py),
# 512 function prompts x 256 new tokens, brace matching off (every row runs its 256 tokens).
#   bash benchmarks/engines.sh OUT_DIR                     # llama-8b and qwen3-moe-16l
#   BASE=/path/to/other/lgen bash benchmarks/engines.sh OUT_DIR   # ... and the compact engine of another lgen tree
#   SHAPES=llama-small PROMPTS=8 NEW=8 ACCEL=cpu bash benchmarks/engines.sh OUT_DIR   # a quick look on a CPU
# Each run prints its records, tokens, whole-run and generation seconds and tokens/s (runs.sh).
set -euo pipefail
root=$(realpath -m "${1:?OUT_DIR}")
here=$(realpath "$(dirname "$0")")
source "$here/runs.sh"
for shape in ${SHAPES:-llama-8b qwen3-moe-16l}; do
  out="$root/$shape"
  mkdir -p "$out"
  SHAPE=$shape random_job "${PROMPTS:-512}" "${NEW:-256}" "${ACCEL:-gpu}" --data.per_device_batch_size 64 --data.block_size 2048
  run compact --model.engine compact
  if [ -n "${BASE:-}" ]; then  # python -m lgen takes lgen from the current folder first
    (cd "$BASE" && run base --model.engine compact)
    same compact base
  fi
  run generate --model.engine generate
  same compact generate
done
