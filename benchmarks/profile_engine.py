"""Where lgen's time goes on one big batch (a diagnostic): python benchmarks/profile_engine.py cuda MODEL_DIR [--random]"""
import json, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from throughput import rust_prompts
from lgen import engine
from lgen.data import GenerationDataModule
from lgen.module import GenerationModule
from lgen.stopping import BraceMatchingCriteria, finish

dev, path = sys.argv[1], sys.argv[2]
if "--random" in sys.argv:
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
n, mnt = (180, 256) if dev == "cuda" else (24, 32)
def sync():
    if dev == "cuda": torch.cuda.synchronize()
f = Path(tempfile.mkdtemp()) / "p.jsonl"
f.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in rust_prompts(n)))
t = time.perf_counter()
m = GenerationModule(path, mnt, use_brace_matching=True, brace_matching_start_level=1, torch_dtype="bfloat16")
m.configure_model(); m.model.to(dev)
print("module", time.perf_counter() - t); t = time.perf_counter()
d = GenerationDataModule(data_files=str(f), mode="complete", text_column_name="prompt", per_device_batch_size=256, max_new_tokens=mnt, block_size=2048)
d.connect(m.tokenizer); d.setup()
batch = d.collate([(False, e) for e in d.examples])
print("data", time.perf_counter() - t); t = time.perf_counter()
b = BraceMatchingCriteria(m.tokenizer, 1, "c")
print("fsm table", time.perf_counter() - t)
ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
print("batch", ids.shape)
for ce in (8, 1000):
    sync(); t = time.perf_counter()
    out = engine.generate(m.model, ids, mask, m.generation_config, mnt, m.eos_token_ids, m.generation_config.pad_token_id, b, None, ce)
    sync(); print(f"engine compact_every={ce}", time.perf_counter() - t, "slots", out.slots); t = time.perf_counter()
    fin = finish(out.tokens, m.tokenizer, m.eos_token_ids, b, None, False, out.brace_stop)
    print("finish", time.perf_counter() - t)
for rows in (8, 180):
    sync(); t = time.perf_counter()
    m.model.generate(input_ids=ids[:rows], attention_mask=mask[:rows], max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(); print(f"hf generate rows={rows} 64 steps", time.perf_counter() - t)
    sync(); t = time.perf_counter()
    m.model.generate(input_ids=ids[:rows], attention_mask=torch.ones_like(mask[:rows]), max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(); print(f"hf generate rows={rows} 64 steps, no padding mask", time.perf_counter() - t)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])) as prof:
    engine.generate(m.model, ids, mask, m.generation_config, 16, m.eos_token_ids, m.generation_config.pad_token_id, b, None, 8)
    sync()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
print(prof.key_averages().table(sort_by="cuda_time_total" if dev == "cuda" else "cpu_time_total", row_limit=15))
