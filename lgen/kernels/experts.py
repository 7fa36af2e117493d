"""Mixture-of-experts layers in a CUDA graph: an experts implementation with no host sync.

transformers runs a model's experts by the implementation its config names (``eager``: a Python
loop over the experts a batch hit, which reads on the host which they are; ``grouped_mm``: one
grouped matmul over tokens sorted by expert, whose fallback for dtypes the kernel lacks reads the
offsets on the host; ``batched_mm``: each token's experts' weights gathered and multiplied at
once). A host read cannot be captured in a CUDA graph ("Cannot copy between CPU and CUDA tensors
during CUDA graph capture"), so a captured decode step runs ``grouped_mm`` where its kernel takes
the dtype (bf16), and ``batched_mm`` otherwise (its gathered weights grow with the rows, which is
what a float32 model on a GPU pays).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lgen.hf.models import base_model


def capturable(dtype: torch.dtype) -> str:
    """The experts implementation a CUDA graph can hold for weights of ``dtype``."""
    return "grouped_mm" if dtype == torch.bfloat16 else "batched_mm"


@contextmanager
def in_graphs(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s experts (if it has any) run :func:`capturable`'s implementation;
    the model's own is put back after, also on an error."""
    model = base_model(model)
    if not getattr(type(model), "_can_set_experts_implementation", lambda: False)():
        yield
        return
    before = model.get_experts_implementation()
    model.set_experts_implementation(capturable(next(model.parameters()).dtype))
    try:
        yield
    finally:
        model.set_experts_implementation(before)
