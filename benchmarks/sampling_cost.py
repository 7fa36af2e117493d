"""What one pass@k step costs: sampling 2,048 rows against the model's forward over them.

    python benchmarks/sampling_cost.py --device cuda        # SmolLM2, bf16, configs/passk.yaml's sampling

Real next-token scores come from prefilling the varied prompts (benchmarks/prompts.py) and taking
each prompt's last position, repeated to ``--rows``. It prints ms per call of lgen's draw at several
top-p candidate counts (``sampling.TOP_P_CANDIDATES``; rows whose top-p set is wider are drawn over
the vocabulary, and the share of such rows is printed), of the vocabulary-wide draw, and of one
decode step of a pool of ``--rows`` rows replayed from a CUDA graph, with SDPA and (on CUDA) with
the span attention.
"""

from __future__ import annotations

import argparse

import torch
from decode_step import timed
from prompts import varied_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lgen.decode import sampling
from lgen.decode.steppers import PoolStepper
from lgen.hf import models
from lgen.kernels.attention import packed_decode, packing_needed, span_decode, spans_available


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args()
    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    enc = tok([r["prompt"] for r in varied_prompts(180)], return_tensors="pt", padding=True,
              add_special_tokens=False).to(args.device)
    config = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95)  # configs/passk.yaml
    with torch.inference_mode():
        last = model(**enc, logits_to_keep=1).logits[:, -1].float()
        logits = last.repeat(args.rows // last.shape[0] + 1, 1)[: args.rows]
        keys = torch.arange(args.rows, device=args.device) * 7919
        steps = torch.zeros(args.rows, dtype=torch.long, device=args.device)
        print(f"{args.rows} rows, vocabulary {logits.shape[1]}, {args.device}, temperature 0.8, top-p 0.95")
        for candidates in (64, 128, 256, 1024):
            sampling.TOP_P_CANDIDATES = candidates
            _, covered = sampling._candidate_draw(logits, config, keys, steps)
            ms = timed(lambda: sampling.next_tokens(logits, config, keys, steps), args.device, 10)
            print(f"  {candidates:>5} candidates: {ms:7.2f} ms a draw, {1 - covered.float().mean():.1%} of rows "
                  "drawn over the vocabulary")
        full = timed(lambda: (sampling.filter_logits(logits, config)
                              + sampling.gumbel_noise(keys, steps, logits.shape[1])).argmax(-1), args.device, 10)
        print(f"  vocabulary-wide: {full:7.2f} ms a draw")
        pool = PoolStepper(model, rows=args.rows, length=enc["input_ids"].shape[1] + 256,
                           graph=args.device == "cuda")
        for start in range(0, args.rows, 180):
            n = min(180, args.rows - start)
            pool.admit(torch.arange(start, start + n, device=args.device), enc["input_ids"][:n],
                       enc["attention_mask"][:n], 1)
        token = logits.argmax(-1)
        for spans in (False, True) if spans_available(logits.device) else (False,):
            pool._graph = None  # a new capture, with this attention
            with packed_decode(packing_needed()), span_decode(spans):
                step = timed(lambda: pool.step(token), args.device, 10)
            print(f"  a decode step of the pool, {'span attention' if spans else 'SDPA'}: {step:7.2f} ms")


if __name__ == "__main__":
    main()
