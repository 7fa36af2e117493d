"""Decode-step attention for grouped key/value heads, without copying the cache per head.

With a mask (left padding needs one), transformers' SDPA function in versions without
``pack_gqa`` expands every layer's key/value cache to all query heads (``repeat_kv``) at every
decode step. For one query token the copy is not needed: the query heads that share a key/value
head can stand in the query-length axis of one SDPA call, and the mask (``[rows, 1, 1, keys]``)
broadcasts over them. ``docs/performance.md`` has the measured difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# arguments attention layers pass that do not change SDPA's result (a sliding window is in the mask)
_NEUTRAL = {"dropout", "scaling", "position_ids", "sliding_window", "use_cache", "cache_position", "is_causal",
            "output_attentions"}


def packing_needed() -> bool:
    """Whether this transformers copies the cache per head (it packs the heads itself where its
    SDPA function has ``pack_gqa``)."""
    return not hasattr(sdpa_attention, "pack_gqa")


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA with a single query token's grouped heads folded into the query axis. Anything else
    (prefill, no grouping, no mask or a per-head one, dropout, softcap, sinks, sparse indices, ...)
    goes to transformers' own SDPA function."""
    groups = getattr(module, "num_key_value_groups", 1)
    unusual = any(arg is not None and name not in _NEUTRAL for name, arg in kwargs.items())
    if (query.shape[2] != 1 or groups == 1 or unusual or kwargs.get("dropout") or kwargs.get("output_attentions")
            or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(rows, heads // groups, groups, dim), key, value, attn_mask=attention_mask,
        scale=kwargs.get("scaling"))
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


@contextmanager
def packed_decode(enabled: bool) -> Iterator[None]:
    """Within the block (one batch's decoding), attention registered as ``sdpa`` runs
    :func:`packed_sdpa`; the previous function is put back after, also on an error.

    The name stays ``sdpa``, so model code that checks it (e.g. to build masks) sees no change; only
    the function behind it is swapped. Nothing happens unless ``enabled`` (see :func:`packing_needed`).
    """
    if not enabled:
        yield
        return
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register("sdpa", packed_sdpa)
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", previous)
