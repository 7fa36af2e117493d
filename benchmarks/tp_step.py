"""One decode step of lgen's pool stepper on a model folder, alone or tensor-parallel.

    python benchmarks/tp_step.py MODEL_DIR --batch 64 256                          # one device
    torchrun --nproc_per_node 2 benchmarks/tp_step.py MODEL_DIR --batch 64 256     # 2-way tensor parallel

Each process loads its shard of the weights (transformers' plan, as ``lgen predict`` with
configs/tp.yaml does), prefills ``--prompt`` random tokens per row and times ``--repeat`` steps of
the whole pool: a CUDA graph on a GPU (``--eager`` for eager steps), eager on CPU (gloo). Rank 0
prints milliseconds per step and the tokens per second that step rate gives.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM

from lgen.decode.steppers import PoolStepper
from lgen.hf import tensor_parallel
from lgen.kernels import decoding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true", help="eager steps on a GPU too (no CUDA graph)")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 **tensor_parallel.load_kwargs(world))
    model = model.to(device).eval() if world == 1 else model.eval()
    rank = torch.distributed.get_rank() if world > 1 else 0
    graph = cuda and not args.eager
    if rank == 0:
        print(f"{args.model}: {world}-way tensor parallel, {args.dtype}, {device.type}, prompt {args.prompt}, "
              f"{'CUDA graph' if graph else 'eager'} steps")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    for batch in args.batch:
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (batch, args.prompt), device=device)
        with torch.inference_mode(), decoding(device):
            stepper = PoolStepper(model, rows=batch, length=args.prompt + args.repeat + 8, graph=graph)
            stepper.prefill(ids, torch.ones_like(ids), 1)
            token = ids[:, -1]
            for _ in range(3):
                stepper.step(token)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeat):
                stepper.step(token)
            if cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / args.repeat * 1000
        if rank == 0:
            print(f"STEP tp={world} batch={batch}: {ms:.2f} ms per step, {batch / ms * 1000:,.0f} tokens/s")
        del stepper
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
