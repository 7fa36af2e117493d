#!/usr/bin/env bash
# Batch-invariant decoding on a GPU: records that do not depend on the batch, and what the mode costs.
# SmolLM2-135M-Instruct in bf16 on 180 varied function prompts (benchmarks/prompts.py), brace
# matching from level 1, max_new_tokens 256; greedy at per_device_batch_size 8 and 1024, then
# sampled (configs/passk.yaml: 20 samples, T 0.8, top-p 0.95) at 8 and 180. Each pair runs with
# model.batch_invariant off and on.
#   bash benchmarks/invariance.sh OUT_DIR
# Prints each run's seconds (as benchmarks/continuous.sh) and, per pair, how many records agree.
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
run() {
  local name=$1; shift
  local start; start=$(date +%s.%N)
  python3 -m lgen predict "$@" "${common[@]}" --output_dir "$out/$name" 2>"$out/$name.log" || { tail -20 "$out/$name.log"; exit 1; }
  python3 - "$out/$name" "$start" <<'PY'
import json, sys, time, pathlib
s = json.loads((pathlib.Path(sys.argv[1]) / "summary.json").read_text())
run = s["runs"][-1]
print(f"RUN {pathlib.Path(sys.argv[1]).name}: {s['records']} records, {s['generated_tokens']} tokens, "
      f"WALL {time.time() - float(sys.argv[2]):.1f} s, generation {s['generation_seconds']} s, {run['tokens_per_second']} tok/s")
PY
}
same() { python3 - "$out/$1" "$out/$2" <<'PY'
import json, sys, pathlib
def records(d):
    rows = [json.loads(l) for p in pathlib.Path(d).glob("*.test.jsonl") for l in p.read_text().splitlines()]
    return {(r["id"], tuple(r["part"]), tuple(r["seq"])): (r["prediction"], r["finish_reason"]) for r in rows}
a, b = records(sys.argv[1]), records(sys.argv[2])
print(f"SAME {pathlib.Path(sys.argv[1]).name} vs {pathlib.Path(sys.argv[2]).name}: {len(a)} and {len(b)} records, "
      f"same predictions: {sum(a[k] == b.get(k) for k in a)}/{len(a)}")
PY
}
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
