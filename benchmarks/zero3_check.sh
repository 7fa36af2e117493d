#!/usr/bin/env bash
# ZeRO-3 (with and without CPU offload) against a plain single-GPU run: the same greedy records.
# Run on a machine with one CUDA GPU and deepspeed installed:  bash benchmarks/zero3_check.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp/zero3-check}
common=(--trainer.accelerator gpu --model.torch_dtype bfloat16 --model.engine generate
        --trainer.enable_progress_bar false --overwrite_output_dir true)
same() { python3 - "$1" "$2" <<'PY'
import sys, pathlib
a, b = (sorted(l for p in pathlib.Path(d).glob("*.test.jsonl") for l in p.read_text().splitlines()) for d in sys.argv[1:])
print(f"{sys.argv[1]} vs {sys.argv[2]}: {len(a)} and {len(b)} records, identical: {a == b}, "
      f"same predictions: {sum(x == y for x, y in zip(a, b))}")
PY
}
# 1. the bundled SmolLM2 on the quickstart prompts
q=(--config configs/quickstart.yaml)
python3 -m lgen predict "${q[@]}" "${common[@]}" --trainer.devices 1 --trainer.precision bf16-true --output_dir "$out/plain"
python3 -m lgen predict "${q[@]}" --config configs/zero3.yaml "${common[@]}" --trainer.devices 1 --output_dir "$out/zero3"
python3 -m lgen predict "${q[@]}" --config configs/zero3_offload.yaml "${common[@]}" --trainer.devices 1 --output_dir "$out/zero3_offload"
same "$out/plain" "$out/zero3"
same "$out/plain" "$out/zero3_offload"
# 2. a random-weight 1.1B Llama (SmolLM2's tokenizer), built from a config: no weights travel
python3 - "$out/rand1b" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from lgen.models import resolve
tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
PY
r=(--config configs/quickstart.yaml --model.model_name_or_path "$out/rand1b" --model.max_new_tokens 32)
python3 -m lgen predict "${r[@]}" "${common[@]}" --trainer.devices 1 --trainer.precision bf16-true --output_dir "$out/rand1b-plain"
python3 -m lgen predict "${r[@]}" --config configs/zero3_offload.yaml "${common[@]}" --trainer.devices 1 --output_dir "$out/rand1b-zero3_offload"
same "$out/rand1b-plain" "$out/rand1b-zero3_offload"
