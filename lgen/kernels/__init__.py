"""What runs under attention and the matmuls while the engines decode: the model runs as the
attention implementation of :mod:`.backend` (its own attention, with masks made for rows that each
sit at their own place in a cache), with the decode attention of :mod:`.attention` in front
(packed heads; span attention in a Triton kernel, :mod:`.triton_ops`) or the batch-invariant ops
and attention of :mod:`.invariant`.

:func:`decoding` is the one way in: the engines enter it around their decoding, and everything it
swaps is put back when it exits, also on an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lgen.kernels import backend
from lgen.kernels.attention import packed_decode, packing_needed, span_decode, spans_available
from lgen.kernels.invariant import batch_invariant


@contextmanager
def no_cudnn_attention(device: torch.device) -> Iterator[None]:
    """On CUDA, SDPA without its cuDNN backend within the block (put back after, also on an error):
    cuDNN's attention builds an execution plan for every new key length, i.e. for every decode
    step of an eager loop; flash and memory-efficient attention need none."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@contextmanager
def decoding(model: torch.nn.Module, *, invariant: bool = False, spans: bool | None = None,
             packed: bool | None = None) -> Iterator[None]:
    """``model`` decoding under :mod:`.backend` on its device: with ``invariant``, the
    batch-invariant mode (its own matmuls, reductions and attention); otherwise packed decode
    attention (``packed``; None: where this transformers copies the cache per head) and span
    attention (``spans``; None: where it runs). Either way without cuDNN attention
    (:func:`no_cudnn_attention`)."""
    device = next(model.parameters()).device
    if invariant:
        with no_cudnn_attention(device), backend.use(model), batch_invariant(device):
            yield
        return
    packed = packing_needed() if packed is None else packed
    spans = spans_available(device) if spans is None else spans
    with no_cudnn_attention(device), backend.use(model), packed_decode(packed), span_decode(spans):
        yield
