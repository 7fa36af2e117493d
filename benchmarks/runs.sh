# Shared by the GPU benchmark scripts: run() and same(), over $out and the "${common[@]}" arguments,
# and random_job() for the scripts that time a random-weight model.
# run NAME ARGS...: one `lgen predict` into $out/NAME; prints its records, tokens and seconds.
# same A B: how many records of $out/A and $out/B agree.
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
# random_job PROMPTS NEW ACCELERATOR [OPTIONS...]: a random-weight model of benchmarks/random_model.py
# (SHAPE, default llama-8b; TOKENIZER, default SmolLM2's) in $out/model, built once, PROMPTS function prompts (benchmarks/prompts.py),
# and $common for a greedy bf16 job of NEW new tokens over them, then OPTIONS; sets $model too.
random_job() {
  local here; here=$(dirname "${BASH_SOURCE[0]}")
  model="$out/model"
  [ -f "$model/config.json" ] || python3 "$here/random_model.py" "$model" --shape "${SHAPE:-llama-8b}" \
      --tokenizer "${TOKENIZER:-smollm2-135m-instruct}"
  python3 "$here/prompts.py" "$out/p.jsonl" --prompts "$1"
  common=(--model.model_name_or_path "$model" --model.max_new_tokens "$2" --data.data_files "$out/p.jsonl"
          --data.text_column_name prompt --data.id_column_name task_id --data.mode complete
          --trainer.accelerator "$3" --trainer.precision bf16-true --model.torch_dtype bfloat16
          --trainer.enable_progress_bar false --overwrite_output_dir true "${@:4}")
}
