"""Throughput: run_gen.py's way against lgen, on the same model and prompts, in one process.

    python benchmarks/throughput.py                      # CPU: 24 prompts, 64 new tokens (minutes)
    python benchmarks/throughput.py --prompt-set quickstart --prompts 32 --max-new-tokens 96 --batch-size 8 4 32
    python benchmarks/throughput.py --device cuda --prompts 180 --max-new-tokens 256 --dtype bfloat16

Three ways to drive the model over Rust function prompts that end in ``{`` (brace matching from
level 1, greedy):

* ``run_gen.py``: dataset order, batches of 8, ``model.generate`` with a per-row Python brace check that
  decodes each row's last token (a host sync per row per step) and stops a batch only when all of
  its rows are done, as run_gen.py does;
* ``lgen-generate``: lgen with ``engine: generate`` (length-sorted plan, one big batch, the brace
  FSM on the device);
* ``lgen bN``: lgen's default ``engine: compact`` with ``per_device_batch_size: N`` (continuous
  batching: prompt groups join a pool of rows as finished rows leave).

For each: seconds, useful tokens (up to each row's stop) per second, the useful-slot fraction
(useful tokens / row-steps computed), the speed-up over the first way, and how many predictions
equal the first way's (all cut by lgen's lexer, so only generation is compared).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from lgen.data import GenerationDataModule
from lgen.decode.stopping import find_close
from lgen.hf import models
from lgen.module import GenerationModule

FUNCTIONS = [
    ("Returns the sum of a and b.", "add", "a: i32, b: i32", "i32"),
    ("Returns the larger of a and b.", "max2", "a: i64, b: i64", "i64"),
    ("Returns n factorial.", "factorial", "n: u64", "u64"),
    ("Returns true if n is prime.", "is_prime", "n: u32", "bool"),
    ("Returns the n-th Fibonacci number.", "fib", "n: u32", "u64"),
    ("Returns the greatest common divisor of a and b.", "gcd", "a: u64, b: u64", "u64"),
    ("Returns the sum of the slice.", "sum", "xs: &[i32]", "i32"),
    ("Returns the largest value in the slice.", "largest", "xs: &[i32]", "i32"),
    ("Returns the string reversed.", "reverse", "s: &str", "String"),
    ("Returns true if s is a palindrome.", "is_palindrome", "s: &str", "bool"),
    ("Counts the vowels in s.", "count_vowels", "s: &str", "usize"),
    ("Converts Celsius to Fahrenheit.", "c_to_f", "c: f64", "f64"),
    ("Returns x clamped to [lo, hi].", "clamp", "x: i32, lo: i32, hi: i32", "i32"),
    ("Returns the average of the slice.", "mean", "xs: &[f64]", "f64"),
    ("Returns the number of words in s.", "word_count", "s: &str", "usize"),
    ("Returns true if n is even.", "is_even", "n: i64", "bool"),
    ("Returns the absolute value of x.", "abs", "x: i32", "i32"),
    ("Returns the square of x.", "square", "x: i64", "i64"),
]


def rust_prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        doc, name, args, ret = FUNCTIONS[i % len(FUNCTIONS)]
        suffix = "" if i < len(FUNCTIONS) else f"_{i // len(FUNCTIONS)}"
        out.append(f"/// {doc}\npub fn {name}{suffix}({args}) -> {ret} {{")
    return out


class SeedBraceCheck(StoppingCriteria):
    """run_gen.py's check: per row, decode the last token and count braces (a host sync each)."""

    def __init__(self, tokenizer, start_level: int = 1) -> None:
        self.tokenizer, self.start = tokenizer, start_level
        self.levels: dict[int, int] = {}
        self.finished: set[int] = set()

    def __call__(self, input_ids, scores, **kwargs):
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, -1].item())
            level = self.levels.get(row, self.start) + text.count("{") - text.count("}")
            self.levels[row] = level
            if level <= 0:
                self.finished.add(row)
        done = len(self.finished) == input_ids.shape[0]
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def cut(text: str) -> tuple[str, bool]:
    close = find_close(text, 1, "c")
    return (text, False) if close is None else (text[: close + 1], True)


def run_seed(model, tok, prompts, max_new_tokens, batch_size, device):
    """Returns (seconds, predictions, useful tokens, slots)."""
    preds, useful, slots = [], 0, 0
    sync(device)
    t0 = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        enc = tok(prompts[b: b + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([SeedBraceCheck(tok)]))
        gen = out[:, enc["input_ids"].shape[1]:]
        slots += gen.numel()
        for row in gen.tolist():
            eos = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            text, closed = cut(tok.decode(row[:eos], skip_special_tokens=True))
            n = len(tok(text, add_special_tokens=False)["input_ids"]) if closed else eos + (eos < len(row))
            preds.append(text)
            useful += n
    sync(device)
    return time.perf_counter() - t0, preds, useful, slots


def run_lgen(path, prompts, max_new_tokens, engine, batch_size, dtype, device, data_file: Path, torch_compile=False):
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lgen.output.directory import OutputDir
    from lgen.output.writer import JsonlWriter

    class Slots(Callback):
        total = 0

        def on_predict_batch_end(self, trainer, pl_module, outputs, *args):
            self.total += outputs.slots

    module = GenerationModule(path, max_new_tokens, use_brace_matching=True, brace_matching_start_level=1,
                              torch_dtype=dtype, engine=engine, torch_compile=torch_compile)
    module.configure_model()  # load outside the timed region, as for the seed
    data = GenerationDataModule(data_files=str(data_file), mode="complete", text_column_name="prompt",
                                per_device_batch_size=batch_size, max_new_tokens=max_new_tokens, block_size=2048)
    # as lgen predict connects it: continuous batching with the compact engine, the memory budget
    data.connect(module.tokenizer, token_budget=module.token_budget,
                 continuous=module.decode.continuous(lockstep=False))
    out = Path(tempfile.mkdtemp())
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        use_distributed_sampler=False,
                        callbacks=[JsonlWriter(OutputDir(out, "test")), slots := Slots()])
    sync(device)
    t0 = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    sync(device)
    seconds = time.perf_counter() - t0
    records = sorted((json.loads(x) for x in (out / "00001-of-00001.test.jsonl").read_text().splitlines()),
                     key=lambda r: r["id"])
    summary = json.loads((out / "summary.json").read_text())
    return seconds, [r["prediction"] for r in records], summary["generated_tokens"], slots.total, \
        summary["finish_reasons"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--prompt-set", default="rust", choices=["rust", "varied", "quickstart"],
                   help="rust: 18 Rust functions repeated; varied: benchmarks/prompts.py; quickstart: its 32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed-batch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, nargs="+", default=[256], help="lgen's per_device_batch_size(s)")
    p.add_argument("--skip-seed", action="store_true")
    p.add_argument("--skip-generate", action="store_true", help="leave out lgen with engine: generate")
    p.add_argument("--compile", action="store_true",
                   help="add a run with model.torch_compile (CUDA only; compile time counts in its seconds)")
    args = p.parse_args()

    path = models.resolve(args.model)
    if args.prompt_set == "varied":
        from prompts import varied_prompts

        prompts = [r["prompt"] for r in varied_prompts(args.prompts)]
    elif args.prompt_set == "quickstart":
        rows = [json.loads(line) for line in open(Path(__file__).parents[1] / "configs/data/quickstart.jsonl")]
        prompts = [r["prompt"] for r in rows][: args.prompts]
    else:
        prompts = rust_prompts(args.prompts)
    data_file = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    # warm-up (kernels, allocator) outside every timed region
    model.generate(**tok(prompts[:2], return_tensors="pt", padding=True).to(args.device), max_new_tokens=4,
                   pad_token_id=tok.pad_token_id)

    rows = []
    if not args.skip_seed:
        s, seed_preds, useful, slots = run_seed(model, tok, prompts, args.max_new_tokens, args.seed_batch_size,
                                                args.device)
        rows.append(("run_gen.py", s, useful, slots, None, seed_preds))
    del model
    ways = [] if args.skip_generate else [("lgen-generate", "generate", False, max(args.batch_size))]
    ways += [(f"lgen b{b}", "compact", False, b) for b in args.batch_size]
    if args.compile:
        ways.append(("lgen-compiled", "compact", True, max(args.batch_size)))
    for name, engine, torch_compile, batch_size in ways:
        s, preds, useful, slots, reasons = run_lgen(path, prompts, args.max_new_tokens, engine, batch_size,
                                                    args.dtype, args.device, data_file, torch_compile)
        rows.append((name, s, useful, slots, reasons, preds))

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    import transformers

    print(f"\n{args.prompts} {args.prompt_set} prompts, max_new_tokens {args.max_new_tokens}, {args.dtype}, {device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, model {args.model}")
    base = {name: s for name, s, *_ in rows}
    first = rows[0][5]
    print(f"{'way':<15}{'seconds':>9}{'useful tok':>11}{'useful tok/s':>13}{'slot use':>10}"
          f"{'vs ' + rows[0][0]:>18}{'same as first':>14}  finish reasons")
    for name, s, useful, slots, reasons, preds in rows:
        same = sum(a == b for a, b in zip(preds, first))
        print(f"{name:<15}{s:>9.2f}{useful:>11}{useful / s:>13.1f}{useful / slots:>10.1%}"
              f"{base[rows[0][0]] / s:>17.2f}x{f'{same}/{len(preds)}':>14}  {reasons or ''}")


if __name__ == "__main__":
    main()
