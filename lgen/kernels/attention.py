"""Decode-step attention: what stands in front of a model's own attention while an engine decodes
(:func:`lgen.kernels.backend.behind`).

The engines decode over a static cache (:mod:`lgen.decode.steppers`): every row has as many positions as
the longest row needs, and a mask hides the rest. Two functions make a decode step cheaper; each
stands in for one batch's decoding by a context manager and is taken away after:

* :func:`packed_decode`: with a mask, transformers' SDPA function in versions without ``pack_gqa``
  expands every layer's key/value cache to all query heads (``repeat_kv``) at every decode step.
  For one query token the copy is not needed: the query heads that share a key/value head can
  stand in the query-length axis of one SDPA call, and the mask (``[rows, 1, 1, keys]``)
  broadcasts over them.
* :func:`span_decode` (CUDA, with Triton): SDPA still reads the whole static cache of every row
  and masks most of it away; :func:`span_attention` reads only the blocks of keys each row's
  mask allows (:class:`Spans`), in a Triton kernel (:func:`lgen.kernels.triton_ops.attention`).

``docs/performance.md`` has the measured differences.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers.integrations import sdpa_attention

from lgen.kernels import backend

# arguments attention layers pass that do not change SDPA's result (a sliding window is in the mask)
_NEUTRAL = {"dropout", "scaling", "position_ids", "sliding_window", "use_cache", "cache_position", "is_causal",
            "output_attentions"}


def packing_needed() -> bool:
    """Whether this transformers copies the cache per head (it packs the heads itself where its
    SDPA function has ``pack_gqa``)."""
    return not hasattr(sdpa_attention, "pack_gqa")


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, *, fallback: Callable | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA with a single query token's grouped heads folded into the query axis. Anything else
    (prefill, no grouping, no mask or a per-head one, dropout, softcap, sinks, sparse indices, ...)
    goes to ``fallback`` (by default transformers' own SDPA function)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or not _plain_decode_step(query, attention_mask, kwargs):
        fallback = fallback or sdpa_attention.sdpa_attention_forward
        return fallback(module, query, key, value, attention_mask, **kwargs)
    rows, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(rows, heads // groups, groups, dim), key, value, attn_mask=attention_mask,
        scale=kwargs.get("scaling"))
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _plain_decode_step(query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """A decode step the two functions here take: one query token, one mask for all heads, and
    nothing that changes attention beyond it (dropout, soft-capping, sinks, sparse indices, ...)."""
    unusual = any(arg is not None and name not in _NEUTRAL for name, arg in kwargs.items())
    return not (query.shape[2] != 1 or unusual or kwargs.get("dropout") or kwargs.get("output_attentions")
                or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1)


@contextmanager
def packed_decode(enabled: bool) -> Iterator[None]:
    """Within the block (one batch's decoding), a decode step's attention runs :func:`packed_sdpa`
    (anything else what stood before). Nothing happens unless ``enabled`` (see :func:`packing_needed`)."""
    def front(previous: Callable) -> Callable:
        return lambda *args, **kwargs: packed_sdpa(*args, fallback=previous, **kwargs)

    with backend.behind(front if enabled else None):
        yield


def allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """Where a query may look: a boolean mask as is; an additive one where it is not far negative."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


class Spans:
    """Each query's span of keys and the mask as a float32 bias, for :func:`span_attention`.

    A call returns ``(bias, starts, ends)`` for a ``[rows, 1, queries, keys]`` mask: ``bias`` is
    ``[rows, queries, keys]``, the mask's additive value where a query may look and ``-inf``
    elsewhere; every key a query may see lies in ``[start, end)``. The layers of one type share a
    mask within a forward (full, sliding, chunked: a mask per type), so each mask's spans are
    computed at the first layer that takes it and kept for the others; a new forward shows as a
    layer index that did not grow, and forgets them (a CUDA graph replays the computations).
    """

    def __init__(self) -> None:
        self.seen: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.layer = -1

    def __call__(self, mask: torch.Tensor, layer: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer is None or layer <= self.layer:
            self.seen.clear()
        self.layer = -1 if layer is None else layer
        kept = self.seen.get(id(mask))
        if kept is None or kept[0] is not mask:
            # a prefill's mask is [rows, 1, queries, keys]: a byte per entry for the temporaries
            allowed = allowed_keys(mask)[:, 0]
            length = allowed.shape[-1]
            hit = allowed.to(torch.uint8)
            some = allowed.any(dim=-1)
            starts = torch.where(some, hit.argmax(dim=-1), length).to(torch.int32)  # argmax: the first hit
            ends = torch.where(some, length - hit.flip(-1).argmax(dim=-1), 0).to(torch.int32)
            del hit
            values = torch.zeros(allowed.shape, device=mask.device) if mask.dtype == torch.bool else mask[:, 0].float()
            kept = (mask, (values.masked_fill_(~allowed, float("-inf")), starts, ends))
            self.seen[id(mask)] = kept
        return kept[1]


def span_attention(module: torch.nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor, *, spans: Spans, scaling: float | None = None,
                   block_queries: int = 64, **kwargs) -> tuple[torch.Tensor, None]:
    """Softmax attention, as SDPA computes it with ``attention_mask``, by
    :func:`lgen.kernels.triton_ops.attention`, which reads only the key blocks of each query's span.
    ``query``: ``[rows, heads, queries, dim]``; ``key``/``value``: ``[rows, kv_heads, keys, dim]``;
    the mask: ``[rows or 1, 1, queries, keys or more]``. Returns ``[rows, queries, heads, dim]``.
    ``block_queries``: see :func:`lgen.kernels.triton_ops.attention`."""
    from lgen.kernels import triton_ops as triton_kernels

    rows, length = query.shape[0], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    bias, starts, ends = spans(attention_mask, getattr(module, "layer_idx", None))
    bias, starts, ends = bias[:, :, :length].expand(rows, -1, -1), starts.expand(rows, -1), ends.expand(rows, -1)
    return triton_kernels.attention(query, key, value, bias, starts, ends, scale, block_queries=block_queries), None


_SPAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spans_available(device: torch.device) -> bool:
    """Whether :func:`span_attention` runs here: on CUDA with Triton installed, on a GPU whose tensor
    cores take bf16 (compute capability 8.0, Ampere, or later)."""
    return (device.type == "cuda" and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(device)[0] >= 8)


def spans_take(query: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`span_attention` computes this attention: values of the queries' size (not the
    smaller values of multi-head latent attention)."""
    return value.shape[-1] == query.shape[-1]


def _span_decode_attention(previous: Callable, spans: Spans) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        if not (query.is_cuda and query.dtype in _SPAN_DTYPES and _plain_decode_step(query, attention_mask, kwargs)
                and spans_take(query, value)):
            return previous(module, query, key, value, attention_mask, **kwargs)
        groups = query.shape[1] // key.shape[1]  # the query heads of a key/value head: one query each
        return span_attention(module, query, key, value, attention_mask, spans=spans, scaling=kwargs.get("scaling"),
                              block_queries=16 if groups <= 16 else 64)
    return attention


@contextmanager
def span_decode(enabled: bool) -> Iterator[None]:
    """Within the block, a decode step's attention (one query token, one mask for all heads, nothing
    unusual such as soft-capping) runs :func:`span_attention`; anything else, the prefill included,
    goes to what stood before (the model's own attention, or :func:`packed_sdpa`). Taken away
    after, also on an error. Nothing happens unless ``enabled`` (see :func:`spans_available`)."""
    spans = Spans()
    with backend.behind((lambda previous: _span_decode_attention(previous, spans)) if enabled else None):
        yield
