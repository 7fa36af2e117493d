"""Useful-slot fraction of the compact engine's CUDA-graph bucket policy, replayed eagerly.

    python benchmarks/slot_use.py --prompts 180 --max-new-tokens 256      # CPU, fp32: minutes

The graph stepper keeps a batch in buckets (8, 12, 16, 24, 32, 48, ...) and pads the live rows
up to one; padded slots are computed but useless. Slot accounting does not depend on the device,
so this replays the policy with the same stepper run eagerly and prints useful tokens / slots
computed for the throughput benchmark's Rust prompts (greedy, brace matching from level 1).
"""

import argparse

from throughput import rust_prompts
from transformers import GenerationConfig

from lgen.engine import CompactEngine
from lgen.module import GenerationModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compact-every", type=int, default=4)
    args = p.parse_args()
    module = GenerationModule(args.model, args.max_new_tokens, use_brace_matching=True, brace_matching_start_level=1)
    module.configure_model()
    tok, eos = module.tokenizer, module.eos_token_ids
    enc = tok(rust_prompts(args.prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    rules = module.stop_rules()
    engine = CompactEngine(config, pad_token_id=tok.pad_token_id, compact_every=args.compact_every, cuda_graphs=True)
    out = engine.run(module.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                     rules=rules, row_keys=None)
    useful = sum(f.tokens for f in rules.finish(out.tokens, out.stop_rule, out.stop_step, tok))
    print(f"{args.prompts} prompts, max_new_tokens {args.max_new_tokens}, compact_every {args.compact_every}: "
          f"{useful} useful tokens / {out.slots} slots = {useful / out.slots:.1%}")


if __name__ == "__main__":
    main()
