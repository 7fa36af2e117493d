"""Run lgen with this process's GPU memory capped, to show ZeRO-3 offload placing a model that
does not fit:  python benchmarks/capped.py GIB predict --config ...
"""

import sys

import torch

from lgen.cli import main

if __name__ == "__main__":
    gib = float(sys.argv[1])
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, 0)
    sys.exit(main(sys.argv[2:]))
