#!/usr/bin/env bash
# Continuous batching on GPUs: speed that does not depend on per_device_batch_size, pass@k, and the
# same records on 1 and 2 GPUs. SmolLM2-135M-Instruct in bf16 on 180 varied function prompts
# (benchmarks/prompts.py), brace matching from level 1, max_new_tokens 256.
#   bash benchmarks/continuous.sh OUT_DIR 1     # batch 8 against one batch; pass@k (180 x 20) on one GPU
#   bash benchmarks/continuous.sh OUT_DIR 2     # ... and pass@k on 2 GPUs (DDP), records compared
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
        --overwrite_output_dir true)
run() {
  local name=$1; shift
  local start; start=$(date +%s.%N)
  python3 -m lgen predict "$@" "${common[@]}" --output_dir "$out/$name" 2>"$out/$name.log" || { tail -20 "$out/$name.log"; exit 1; }
  python3 - "$out/$name" "$start" <<'PY'
import json, sys, time, pathlib
s = json.loads((pathlib.Path(sys.argv[1]) / "summary.json").read_text())
run = s["runs"][-1]
print(f"RUN {pathlib.Path(sys.argv[1]).name}: world {run['world_size']}, {s['records']} records, "
      f"{s['generated_tokens']} tokens, WALL {time.time() - float(sys.argv[2]):.1f} s, predict {run['wall_seconds']} s, "
      f"generation {s['generation_seconds']} s (summed over ranks), {run['tokens_per_second']} tok/s")
PY
}
same() { python3 - "$out/$1" "$out/$2" <<'PY'
import json, sys, pathlib
def records(d):
    rows = [json.loads(l) for p in pathlib.Path(d).glob("*.test.jsonl") for l in p.read_text().splitlines()]
    return {(r["id"], tuple(r["part"]), tuple(r["seq"])): (r["prediction"], r["finish_reason"]) for r in rows}
a, b = records(sys.argv[1]), records(sys.argv[2])
print(f"SAME {pathlib.Path(sys.argv[1]).name} vs {pathlib.Path(sys.argv[2]).name}: {len(a)} and {len(b)} records, "
      f"same keys: {a.keys() == b.keys()}, same predictions: {sum(a[k] == b.get(k) for k in a)}/{len(a)}")
PY
}
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
