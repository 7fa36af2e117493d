"""Where a ZeRO-3 model's numbers leave the plain model's: one process, one GPU (or CPU), one rank.

    python benchmarks/zero3_diff.py --device cuda --dtype bfloat16       # needs deepspeed
    DS_ACCELERATOR=cpu python benchmarks/zero3_diff.py --device cpu

Loads the model twice in the same process, plainly and partitioned under ZeRO-3 with lgen's
settings (:mod:`lgen.hf.zero3`; DeepSpeed wraps an outer module, as Lightning wraps the
LightningModule), prefills the quickstart prompts through both and prints the largest difference
of each decoder layer's output and of each part of the first layer, then greedy-decodes 64 tokens
with lgen's compact engine and counts identical rows. It also prints the global math settings
before and after DeepSpeed is set up and each model's buffer dtypes. Both models run in this one
process: a difference here is in DeepSpeed's path itself, no difference here but one between
separate runs points at process-wide settings. ``--keep-rotary`` skips lgen's float32 rotary
frequencies (:mod:`lgen.hf.precision`) to show what ``zero.Init`` alone does to them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lgen.decode import CompactEngine, DecodeSettings
from lgen.decode.stopping import EndOfSequence, Length, StopRules
from lgen.hf import models, precision, zero3


def flags() -> dict[str, object]:
    m = torch.backends.cuda.matmul
    return {"bf16_reduced_reduction": m.allow_bf16_reduced_precision_reduction, "tf32": m.allow_tf32,
            "fp16_reduced_reduction": m.allow_fp16_reduced_precision_reduction,
            "default_dtype": str(torch.get_default_dtype()), "linear": torch.nn.functional.linear.__module__}


class Outer(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def outputs(named: list[tuple[str, torch.nn.Module]], run) -> dict[str, torch.Tensor]:
    """Each named module's (first) output during ``run()``."""
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            outs[name] = (output[0] if isinstance(output, tuple) else output).float().cpu()
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in named]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return outs


def layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"layers.{i}", layer) for i, layer in enumerate(model.model.layers)]


def first_layer_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The embedding, the rotary embedding (its cosines) and each submodule of the first decoder layer."""
    named = [("embed_tokens", model.model.embed_tokens), ("rotary_emb (cos)", model.model.rotary_emb)]
    return named + [(f"layers.0.{n}" if n else "layers.0", m) for n, m in model.model.layers[0].named_modules()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prompts", default="configs/data/quickstart.jsonl")
    p.add_argument("--keep-rotary", action="store_true", help="leave the rotary frequencies as zero.Init made them")
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dtype = getattr(torch, args.dtype)
    path = models.resolve(args.model)
    print("before deepspeed:", flags())
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:  # as lgen.module does
        tok.pad_token = tok.eos_token
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    config = zero3.inference_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    keep = HfDeepSpeedConfig(config)  # noqa: F841 (transformers holds it weakly)
    with deepspeed.zero.Init(config_dict_or_path=config):  # as Lightning enters it around configure_model
        sharded = AutoModelForCausalLM.from_pretrained(path).eval()
    if not args.keep_rotary:
        precision.rotary_in_float32(sharded)
    ds_engine = deepspeed.initialize(model=Outer(sharded), config=config)[0]
    zero3.step_per_forward(ds_engine, sharded)
    print("after deepspeed: ", flags())
    prompts = [json.loads(line)["prompt"] for line in open(args.prompts)]
    enc = tok(prompts, return_tensors="pt", padding=True).to(args.device)
    with torch.inference_mode():
        for title, named in (("per layer", layers), ("first layer", first_layer_parts)):
            a = outputs(named(plain), lambda: plain(**enc))
            b = outputs(named(sharded), lambda: ds_engine(lambda m: m(**enc)))
            diffs = {n: f"{(x - b[n]).abs().max().item():.3g}" for n, x in a.items()}
            print(f"prefill, max |plain - zero3| {title}:", diffs)
        print("buffers, plain:", {n: str(b.dtype) for n, b in plain.named_buffers()},
              "zero3:", {n: str(b.dtype) for n, b in sharded.named_buffers()})
        gen = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

        def decode(m):
            rules = StopRules([EndOfSequence([tok.eos_token_id]), Length()])
            return CompactEngine(gen, DecodeSettings(), pad_token_id=tok.pad_token_id).run(
                m, enc["input_ids"], enc["attention_mask"], max_new_tokens=64, rules=rules, row_keys=None).tokens

        x, y = decode(plain), ds_engine(decode)
    print(f"greedy rows identical: {sum(bool(r) for r in (x == y).all(dim=1))}/{len(prompts)}")


if __name__ == "__main__":
    main()
