"""Run lgen with only GIB of GPU memory free: a ballast tensor takes the rest first, so lgen (and
``max_batch_tokens: auto``, which reads the free memory) sees a smaller GPU. Prints the peak memory
lgen's tensors reached.
    python benchmarks/capped.py GIB predict --config ...
"""

import os
import sys

import torch

from lgen.cli import main

if __name__ == "__main__":
    gib = float(sys.argv[1])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # each rank caps its own GPU
    free, _ = torch.cuda.mem_get_info(device)
    ballast = torch.empty(max(free - int(gib * 2**30), 0), dtype=torch.uint8, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        code = main(sys.argv[2:])
    finally:
        peak = (torch.cuda.max_memory_allocated(device) - ballast.numel()) / 2**30
        reserved = (torch.cuda.max_memory_reserved(device) - ballast.numel()) / 2**30
        print(f"CAPPED {gib} GiB free at start; peak of lgen's tensors {peak:.2f} GiB ({reserved:.2f} GiB reserved)",
              flush=True)
    sys.exit(code)
