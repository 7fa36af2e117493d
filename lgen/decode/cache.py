"""Key/value caches of fixed shape, written at positions held on the device, so that a decode step
depends on no host value and can be captured once as a CUDA graph (:mod:`lgen.decode.graphs`)."""

from __future__ import annotations

import inspect

import torch

from lgen.hf.models import base_model


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its cache: ``cache`` in the transformers
    releases that deprecate ``past_key_values`` (removed in 5.40), ``past_key_values`` before."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class SlotCache:
    """A KV cache of fixed shape per layer (``[rows, kv_heads, length, head_dim]``) written at the
    positions held in the device tensor ``write_at``: nothing in a decode step depends on host
    values, so the step can be captured once as a CUDA graph and replayed. It implements the part
    of transformers' ``Cache`` interface that attention layers call (``update``)."""

    is_compileable = True

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.k, self.v, self.write_at = k, v, write_at

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k[layer_idx].index_copy_(2, self.write_at, key_states)
        self.v[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def select(self, rows: torch.Tensor) -> SlotCache:
        return SlotCache([k[rows] for k in self.k], [v[rows] for v in self.v], self.write_at)


class PoolCache(SlotCache):
    """A :class:`SlotCache` whose rows are written each at its own position (``write_at[row]``):
    rows of a pool joined at different times and are at different lengths."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.k[layer_idx][rows, :, self.write_at] = key_states[:, :, 0]
        self.v[layer_idx][rows, :, self.write_at] = value_states[:, :, 0]
        return self.k[layer_idx], self.v[layer_idx]

    def select(self, rows: torch.Tensor) -> PoolCache:
        return PoolCache([k[rows] for k in self.k], [v[rows] for v in self.v], self.write_at)
