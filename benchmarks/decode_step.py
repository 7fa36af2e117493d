"""Per-step costs: one decode step of a random-weight model, and the brace FSM's check beside it.

    python benchmarks/decode_step.py --device cuda --shape smollm2 --batch 128 512
    python benchmarks/decode_step.py --device cuda --shape llama-1b --batch 1 32 128

The model has random weights built from a config (no download); the tokenizer is SmolLM2's
(``smollm2-135m-instruct``) so the FSM table has a real 49k vocabulary. Prompts are 128 tokens;
``eager ms`` is a one-token forward against a ``DynamicCache`` (transformers' own attention path);
``graph ms`` is lgen's compact engine step: a CUDA graph over a static cache and a padding mask,
with grouped-head decode attention (:mod:`lgen.kernels.attention`); ``stock ms`` is the same step with
transformers' own SDPA function (which, in versions without ``pack_gqa``, copies the cache to
every query head when there is a mask; where transformers has it, both columns run the same code).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from lgen.decode.braces import token_table
from lgen.decode.cache import cache_argument
from lgen.decode.graphs import compile_layers
from lgen.decode.steppers import PoolStepper
from lgen.decode.stopping import BraceMatching
from lgen.hf import models
from lgen.kernels import attention

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True),
}


def timed(fn, device: str, repeat: int) -> float:
    """Mean milliseconds per call."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--cache", type=int, default=236, help="positions in the static cache (prompt + room)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct", help="for the FSM table: a folder or an alias")
    p.add_argument("--compile", choices=["auto", "static", "dynamic"],
                   help="also time lgen's step with its decoder layers compiled (model.torch_compile): shapes "
                        "as lgen compiles them (auto: static, then symbolic once they change), static, or "
                        "dynamic from the start; 'compiled ms' per step, 'compile s' to build it")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, profile 5 of lgen's steps run without a graph: kernels per step, "
                        "their summed GPU time and the costliest kernels")
    args = p.parse_args()
    if args.cache < args.prompt + args.repeat + 8:
        p.error("--cache must hold the prompt and every timed step: at least --prompt + --repeat + 8")
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(models.resolve(args.tokenizer))
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[args.shape])
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.shape} ({params:.0f}M params), {args.dtype}, {args.device}"
          f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, prompt {args.prompt}")
    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as lgen does: no per-length cuDNN plans
    print(f"{'batch':>6}{'eager ms':>10}{'stock ms':>10}{'graph ms':>10}{'fsm ms':>9}{'fsm/step':>10}")
    for batch in args.batch:
        with torch.inference_mode():
            ids = torch.randint(0, config.vocab_size, (batch, args.prompt), device=args.device)
            cache = DynamicCache(config=config)
            arg = cache_argument(model)
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{arg: cache})
            token = ids[:, -1:]

            def step():
                model(input_ids=token, use_cache=True, **{arg: cache})
                cache.crop(-1)  # keep the cache the same size for every timed step

            step_ms = timed(step, args.device, args.repeat)
            graph_ms = {}
            for name, packed in (("stock", False), ("lgen", attention.packing_needed())):
                stepper = PoolStepper(model, rows=batch, length=args.cache, graph=args.device == "cuda")
                stepper.prefill(ids, torch.ones_like(ids), 1)
                with attention.packed_decode(packed):
                    graph_ms[name] = timed(lambda s=stepper: s.step(token[:, 0]), args.device, args.repeat)
                del stepper
            rule = BraceMatching(token_table(tok, "c"), start_level=1, language="c")
            rule.start(batch, torch.device(args.device), args.repeat * 20)
            tokens = torch.randint(0, config.vocab_size, (batch,), device=args.device)
            fsm_ms = timed(lambda: rule.advance(tokens), args.device, args.repeat * 10)
        graph, stock = graph_ms["lgen"], graph_ms["stock"]
        print(f"{batch:>6}{step_ms:>10.2f}{stock:>10.2f}{graph:>10.2f}{fsm_ms:>9.3f}{fsm_ms / graph:>10.2%}")
        if args.profile:
            with torch.inference_mode():
                profile(model, ids, token, args.cache - args.prompt, args.device)
    if args.compile:
        compiled(model, config, args)


def compiled(model: torch.nn.Module, config: LlamaConfig, args: argparse.Namespace) -> None:
    """lgen's graph step with the decoder layers compiled (after every uncompiled timing: from here
    on every forward of the layers runs compiled code): ms per step, seconds to compile and capture
    a new batch size, and the largest logit difference from the uncompiled step."""
    print(f"{'batch':>6}{'compiled ms':>13}{'compile s':>11}{'max diff':>10}   ({args.compile} shapes)")
    graph = args.device == "cuda"
    room = args.cache - args.prompt
    with torch.inference_mode():
        inputs, expected = {}, {}
        packed = attention.packing_needed()
        for batch in args.batch:
            ids = torch.randint(0, config.vocab_size, (batch, args.prompt), device=args.device)
            plain = PoolStepper(model, rows=batch, length=args.prompt + room, graph=graph)
            plain.prefill(ids, torch.ones_like(ids), 1)
            with attention.packed_decode(packed):
                inputs[batch], expected[batch] = ids, plain.step(ids[:, -1])
            del plain
        compile_layers(model, dynamic={"auto": None, "static": False, "dynamic": True}[args.compile])
        for batch, ids in inputs.items():
            t0 = time.perf_counter()
            stepper = PoolStepper(model, rows=batch, length=args.prompt + room, graph=graph)
            stepper.prefill(ids, torch.ones_like(ids), 1)
            with attention.packed_decode(packed):
                got = stepper.step(ids[:, -1])
                if graph:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                diff = (got - expected[batch]).abs().max().item()
                ms = timed(lambda s=stepper, i=ids: s.step(i[:, -1]), args.device, args.repeat)
            print(f"{batch:>6}{ms:>13.2f}{seconds:>11.1f}{diff:>10.3g}")
            del stepper


def profile(model: torch.nn.Module, ids: torch.Tensor, token: torch.Tensor, room: int, device: str) -> None:
    """Kernels per step and where the GPU time goes, over 5 eager steps of lgen's static-cache step
    (a graph replays the same kernels without the launch gaps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = 5
    stepper = PoolStepper(model, rows=ids.shape[0], length=ids.shape[1] + room, graph=False)
    stepper.prefill(ids, torch.ones_like(ids), 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with attention.packed_decode(attention.packing_needed()):
        for _ in range(3):
            stepper.step(token[:, 0])
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                stepper.step(token[:, 0])
            if device == "cuda":
                torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels)
    print(f"  profile: {len(kernels) / steps:.0f} kernels per step, "
          f"{total_us / steps / 1000:.2f} ms of GPU time a step")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    for name, times in top:
        print(f"  {sum(times) / steps / 1000:8.3f} ms {len(times) / steps:5.0f}x  {name[:110]}")


if __name__ == "__main__":
    main()
