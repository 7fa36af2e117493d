#!/usr/bin/env bash
# Same greedy records on 1 GPU, on N GPUs with DDP, and under DeepSpeed ZeRO-3 with and without
# CPU offload; tokens/s of each. Needs N CUDA GPUs and deepspeed.
#   bash benchmarks/scale_check.sh OUT_DIR N records   # SmolLM2 on the quickstart prompts (uneven ranks)
#   bash benchmarks/scale_check.sh OUT_DIR N offload   # a 1.1B float32 model with 4 GiB of GPU memory free (1 rank)
#   bash benchmarks/scale_check.sh OUT_DIR N speed     # tokens/s of a random 1.1B model, 512 prompts
#   bash benchmarks/scale_check.sh OUT_DIR 1 budget    # max_batch_tokens: auto on a GPU with 8 GiB free
# The random models take SmolLM2's tokenizer, or the one in $TOKENIZER (a folder).
set -euo pipefail
out=${1:?OUT_DIR}; n=${2:-2}; part=${3:-records}
common=(--trainer.accelerator gpu --trainer.enable_progress_bar false --overwrite_output_dir true)
plain=(--trainer.precision bf16-true --model.torch_dtype bfloat16)
lgen() { local name=$1; shift; python3 -m lgen predict "$@" "${common[@]}" --output_dir "$out/$name"; }
same() { python3 - "$out/$1" "$out/$2" <<'PY'
import json, sys, pathlib
def records(d):
    rows = [json.loads(l) for p in pathlib.Path(d).glob("*.test.jsonl") for l in p.read_text().splitlines()]
    return {(r["id"], tuple(r["part"]), tuple(r["seq"])): r["prediction"] for r in rows}
a, b = records(sys.argv[1]), records(sys.argv[2])
print(f"SAME {pathlib.Path(sys.argv[1]).name} vs {pathlib.Path(sys.argv[2]).name}: {len(a)} and {len(b)} records, "
      f"same keys: {a.keys() == b.keys()}, same predictions: {sum(a[k] == b.get(k) for k in a)}/{len(a)}")
PY
}
speed() { for d in "$@"; do python3 - "$out/$d" <<'PY'
import json, sys, pathlib
s = json.loads((pathlib.Path(sys.argv[1]) / "summary.json").read_text())
run = s["runs"][-1]
print(f"SPEED {pathlib.Path(sys.argv[1]).name}: world {run['world_size']}, {run['records_written']} records, "
      f"{run['generated_tokens']} tokens, generation {run['generation_seconds']} s (summed over ranks), "
      f"wall {run['wall_seconds']} s, {run['tokens_per_second']} tok/s")
PY
done; }
# copies FILE N LONG: the quickstart prompts N times over (ids "<id>#<copy>"); LONG=1 repeats
# the k-th copy's prompt text 8 + k % 8 times
copies() { python3 - "$@" <<'PY'
import json, sys
path, n, long = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rows = [json.loads(l) for l in open("configs/data/quickstart.jsonl")]
with open(path, "w") as f:
    for k in range(n):
        for r in rows:
            prompt = r["prompt"] * (8 + k % 8) if long else r["prompt"]
            f.write(json.dumps({**r, "task_id": f"{r['task_id']}#{k}", "prompt": prompt}) + "\n")
PY
}
rand1b() { python3 - "$1" <<'PY'
import os, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from lgen.hf.models import resolve
tok = AutoTokenizer.from_pretrained(resolve(os.environ.get("TOKENIZER", "smollm2-135m-instruct")))
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
PY
}
case $part in
records)
  # 32 prompts in batches of 12: 3 batches, so ranks hold different numbers of rows
  q=(--config configs/quickstart.yaml --data.per_device_batch_size 12)
  lgen plain "${q[@]}" "${plain[@]}" --trainer.devices 1
  # ZeRO-3 decodes with the compact engine without CUDA graphs (hooks gather the weights)
  lgen plain-eager "${q[@]}" "${plain[@]}" --model.cuda_graphs false --trainer.devices 1
  lgen plain-generate "${q[@]}" "${plain[@]}" --model.engine generate --trainer.devices 1
  lgen "ddp$n" "${q[@]}" --config configs/ddp.yaml --trainer.devices "$n"
  lgen "zero3-$n" "${q[@]}" --config configs/zero3.yaml --trainer.devices "$n"
  lgen "zero3_offload-$n" "${q[@]}" --config configs/zero3_offload.yaml --trainer.devices "$n"
  # the same in float32, where the GPU kernels DeepSpeed's path takes do not change the sums
  lgen f32-eager "${q[@]}" --trainer.precision 32-true --model.cuda_graphs false --trainer.devices 1
  lgen "f32-zero3-$n" "${q[@]}" --config configs/zero3.yaml --trainer.precision 32-true --trainer.devices "$n"
  same plain plain-eager; same plain plain-generate; same plain "ddp$n"
  same plain-eager "zero3-$n"; same plain-eager "zero3_offload-$n"; same f32-eager "f32-zero3-$n"
  speed plain plain-eager plain-generate "ddp$n" "zero3-$n" "zero3_offload-$n" ;;
offload)
  # 1.1B parameters in float32 (4.4 GB) with 4 GiB of GPU memory left free: the weights alone do not fit
  rand1b "$out/rand1b"
  r=(--config configs/quickstart.yaml --model.model_name_or_path "$out/rand1b" --model.max_new_tokens 32
     --trainer.precision 32-true --model.torch_dtype float32)
  # one ZeRO-3 rank decodes with the compact engine, without CUDA graphs (hooks gather the weights)
  lgen rand1b-plain "${r[@]}" --model.cuda_graphs false --trainer.devices 1
  if python3 benchmarks/capped.py 4 predict "${r[@]}" "${common[@]}" --trainer.devices 1 \
       --output_dir "$out/rand1b-capped-plain" > "$out/capped-plain.log" 2>&1; then
    echo "CAPPED plain run fitted"; else echo "CAPPED plain run failed: $(grep -o 'OutOfMemoryError.*' "$out/capped-plain.log" | head -c 200)"; fi
  python3 benchmarks/capped.py 4 predict "${r[@]}" --config configs/zero3_offload.yaml --trainer.precision 32-true \
    "${common[@]}" --trainer.devices 1 --output_dir "$out/rand1b-capped-zero3_offload"
  same rand1b-plain rand1b-capped-zero3_offload
  speed rand1b-plain rand1b-capped-zero3_offload ;;
speed)
  [ -d "$out/rand1b" ] || rand1b "$out/rand1b"
  copies "$out/prompts512.jsonl" 16 0
  s=(--config configs/quickstart.yaml --model.model_name_or_path "$out/rand1b" --model.max_new_tokens 128
     --model.use_brace_matching false --data.data_files "$out/prompts512.jsonl" --data.per_device_batch_size 128)
  lgen 1b-plain "${s[@]}" "${plain[@]}" --trainer.devices 1
  lgen "1b-ddp$n" "${s[@]}" --config configs/ddp.yaml --trainer.devices "$n"
  lgen "1b-zero3-$n" "${s[@]}" --config configs/zero3.yaml --trainer.devices "$n"
  lgen "1b-zero3_offload-$n" "${s[@]}" --config configs/zero3_offload.yaml --trainer.devices "$n"
  same 1b-plain "1b-ddp$n"
  speed 1b-plain "1b-ddp$n" "1b-zero3-$n" "1b-zero3_offload-$n" ;;
budget)
  # long prompts, no row cap: the auto budget alone sizes the batches and must fit
  [ -d "$out/rand1b" ] || rand1b "$out/rand1b"
  copies "$out/long.jsonl" 8 1
  b=(--config configs/quickstart.yaml --model.model_name_or_path "$out/rand1b" --model.max_new_tokens 128
     --model.use_brace_matching false --data.data_files "$out/long.jsonl" --data.block_size 2048
     --data.per_device_batch_size 100000 "${plain[@]}" "${common[@]}" --trainer.devices 1)
  if ! python3 benchmarks/capped.py 8 predict "${b[@]}" --data.max_batch_tokens auto --output_dir "$out/budget-auto" \
      > "$out/budget-auto.log" 2>&1; then
    echo "BUDGET auto run failed: $(grep -o 'OutOfMemoryError.*' "$out/budget-auto.log" | head -c 200 || true)"; exit 1
  fi
  grep -E "auto ->|CAPPED" "$out/budget-auto.log" || true
  tokens=$(grep -o 'auto -> [0-9]*' "$out/budget-auto.log" | grep -o '[0-9]*$' || true)
  [ -n "$tokens" ] || { echo "BUDGET no auto budget in $out/budget-auto.log"; exit 1; }
  # a hint, not a test: the doubled cache and the prefill activations never peak together
  if python3 benchmarks/capped.py 8 predict "${b[@]}" --data.max_batch_tokens $((2 * tokens)) \
      --output_dir "$out/budget-twice" > "$out/budget-twice.log" 2>&1; then echo "BUDGET twice the auto budget also fitted"
  elif grep -q OutOfMemoryError "$out/budget-twice.log"; then echo "BUDGET twice the auto budget ran out of memory"
  else echo "BUDGET twice the auto budget failed (not out of memory): see $out/budget-twice.log"; fi
  grep CAPPED "$out/budget-twice.log" || true ;;
esac
