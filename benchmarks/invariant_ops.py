"""Batch invariance, op by op, and what it costs a decode step.

    python benchmarks/invariant_ops.py --device cuda --rows 8 256 2048
    python benchmarks/invariant_ops.py --device cpu --rows 8 32

Part 1 computes each op on rows alone and inside batches of several sizes (random data) and prints
how many rows differ from their result alone, plainly and under :mod:`lgen.kernels.invariant`. Attention is
checked for a decode step (one query, 1 to 1,000 keys per row, the batch's cache longer than any
row needs): plain SDPA (on CUDA each backend that takes a mask), and batch-invariant mode's
attention (chunked on CPU, the Triton kernel on CUDA).

Part 2 times one decode step of a SmolLM2-shaped model (random weights, bf16 on CUDA) over a pool
of ``--rows`` rows whose cache holds 1,024 positions, replayed from a CUDA graph on CUDA: plain,
then batch-invariant, with the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lgen.decode.steppers import PoolStepper
from lgen.kernels import decoding, invariant
from lgen.kernels.attention import Spans, packed_decode, span_attention

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)


def mismatches(fn, x: torch.Tensor, sizes: list[int], mode) -> int:
    """Rows whose result inside a batch of each size differs from their result alone."""
    bad = 0
    with mode():
        alone = [fn(x[i:i + 1]) for i in range(max(sizes))]
        for size in sizes:
            out = fn(x[:size])
            bad += sum(not torch.equal(out[i:i + 1], alone[i]) for i in range(size))
    return bad


def ops(device: torch.device, dtype: torch.dtype, sizes: list[int]) -> None:
    torch.manual_seed(0)
    tiles = invariant.Tiles.for_device(device)
    x = torch.randn(max(sizes), 576, device=device, dtype=dtype)
    w = torch.randn(576, 1536, device=device, dtype=dtype) / 24
    cases = {
        "linear (mm)": lambda t: t @ w,
        "linear + bias (addmm)": lambda t: torch.addmm(w[0], t, w),
        "rms norm (mean)": lambda t: t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-5),
        "softmax": lambda t: t.float().softmax(-1),
        "cumsum": lambda t: t.float().cumsum(-1),
    }
    print(f"{'op':<28}{'plain':>8}{'invariant':>11}   rows differing from alone, over batches of {sizes}")
    for name, fn in cases.items():
        plain = mismatches(fn, x, sizes, contextlib.nullcontext)
        inv = mismatches(fn, x, sizes, lambda: invariant.BatchInvariantOps(tiles))
        print(f"{name:<28}{plain:>8}{inv:>11}")
    attention(device, dtype, sizes, tiles)


def attention(device: torch.device, dtype: torch.dtype, sizes: list[int], tiles: invariant.Tiles) -> None:
    torch.manual_seed(1)
    rows, heads, kv, dim = max(sizes), 9, 3, 64
    lengths = torch.randint(1, 1000, (rows,), device=device)
    keys = int(lengths.max())
    q = torch.randn(rows, heads, 1, dim, device=device, dtype=dtype)
    k = torch.randn(rows, kv, keys + 37, dim, device=device, dtype=dtype)
    v = torch.randn(rows, kv, keys + 37, dim, device=device, dtype=dtype)
    neg = torch.finfo(dtype).min
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv

    def mask_for(r: slice, width: int) -> torch.Tensor:
        pos = torch.arange(width, device=device)
        return torch.where(pos[None, None, None, :] < lengths[r, None, None, None], 0.0, neg).to(dtype)

    def decode(backend):
        def run(r: slice, width: int):
            args = (q[r], k[r, :, :width], v[r, :, :width], mask_for(r, width))
            if backend == "chunked":
                with invariant.BatchInvariantOps(tiles):
                    return invariant.chunked_attention(module, *args, tiles=tiles, scaling=dim ** -0.5)[0]
            if backend == "triton":
                return span_attention(module, *args, spans=Spans(), scaling=dim ** -0.5)[0]
            with packed_decode(True), _backend(backend):
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
                return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, scaling=dim ** -0.5)[0]
        return run

    backends = ["chunked", "math"] + (["triton", "efficient", "cudnn"] if device.type == "cuda" else ["flash"])
    for backend in backends:
        run = decode(backend)
        bad = 0
        try:
            alone = [run(slice(i, i + 1), int(lengths[i])) for i in range(rows)]
            for size in sizes:
                width = int(lengths[:size].max()) + 37  # the batch's cache is longer than any row needs
                out = run(slice(0, size), width)
                bad += sum(not torch.equal(out[i], alone[i][0]) for i in range(size))
            print(f"{'decode attention, ' + backend:<28}{'':>8}{bad:>11}")
        except RuntimeError as err:
            print(f"{'decode attention, ' + backend:<28} not run: {str(err).splitlines()[0][:80]}")


@contextlib.contextmanager
def _backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    with sdpa_kernel([chosen]):
        yield


def step_time(device: torch.device, dtype: torch.dtype, rows: int, repeat: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device=device, dtype=dtype).eval()
    graph = device.type == "cuda"
    times = {}
    for name in ("plain", "invariant"):
        on = name == "invariant"
        with torch.inference_mode(), decoding(device, invariant=on, packed=True, spans=False):
            stepper = PoolStepper(model, rows=rows, length=1024, graph=graph, aligned=on)
            for start in range(0, rows, 256):  # prompts of 128 tokens, prefilled 256 at a time
                slots = torch.arange(start, min(rows, start + 256), device=device)
                ids = torch.randint(0, 49152, (slots.numel(), 128), device=device)
                stepper.admit(slots, ids, torch.ones_like(ids), 1)
            token = torch.zeros(rows, dtype=torch.long, device=device)
            for _ in range(3):
                stepper.step(token)
            if graph:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeat):
                stepper.step(token)
            if graph:
                torch.cuda.synchronize()
            times[name] = (time.perf_counter() - start) / repeat * 1000
    print(f"decode step, {rows} rows x 1024 positions: plain {times['plain']:.2f} ms, "
          f"invariant {times['invariant']:.2f} ms ({times['plain'] / times['invariant']:.2f}x the plain speed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-ops", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    if not args.skip_ops:
        ops(device, dtype, [1, 3, 8, 64] if device.type == "cpu" else [1, 3, 8, 64, 300])
    for rows in args.rows:
        step_time(device, dtype, rows, args.repeat)


if __name__ == "__main__":
    main()
