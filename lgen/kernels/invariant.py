"""Batch-invariant decoding: each row computed as if it were alone, bit for bit, in any dtype.

A kernel's result for one row can depend on the others: a matmul, a norm or a softmax picks its
blocking (split-K, tiles, threads per row) from the shape of the whole batch, and summing in
another order changes the last bits; with a near-tie the argmax flips and the completion diverges.
Within :func:`batch_invariant`, a :class:`TorchDispatchMode` (it sees the ops below any model
code, so it covers every architecture transformers loads) fixes the order of every sum:

* **matmuls** (``mm``, ``addmm``, ``bmm``) and **row reductions** (``sum``, ``mean``, softmax,
  log-softmax, ``cumsum``, layer norm over the last dims) run on fixed tiles of rows, padded with
  zeros and laid out one way, so every call has the same shape and layout whatever the batch: the
  kernel and its reduction order are fixed, and a row's result depends on that row only. On CUDA,
  matmuls and sums run instead in Triton kernels of one blocking (:mod:`lgen.kernels.triton_ops`).
* **attention** (in front of the model's own, :mod:`lgen.kernels.backend`) reduces over the keys
  in blocks of a fixed size from key 0, and a block past a row's last key adds exact zeros
  (:func:`chunked_attention`; on CUDA the Triton kernel, which does not read those blocks). The
  engines lay each row out *from position 0* (no left padding, see
  :class:`lgen.decode.steppers.PoolStepper`), so a row's keys fall in the same blocks whoever
  shares its batch.

On a CPU the tiles cost padding and many small calls; on CUDA the attention kernel reads only each
row's keys, not the whole static cache. ``docs/precision.md`` has the figures.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from lgen.errors import UnsupportedModel
from lgen.kernels import backend
from lgen.kernels.attention import Spans, allowed_keys, span_attention, spans_take

aten = torch.ops.aten


@dataclass(frozen=True)
class Tiles:
    """The fixed shapes: ``rows`` for matmuls, ``batch`` x ``queries`` for batched matmuls, about
    ``reduce`` elements for a reduction (its rows then follow from its row length, never from the
    batch), and for attention ``keys`` per chunk and ``prefill`` query rows per tile."""

    rows: int
    batch: int
    queries: int
    reduce: int
    keys: int
    prefill: int
    triton: bool = False  # on CUDA: matmuls, sums and attention by :mod:`lgen.kernels.triton_ops`

    @staticmethod
    def for_device(device: torch.device) -> Tiles:
        # CUDA: Triton kernels of one blocking, and large tiles for the rest; CPU: small tiles, since
        # every padded row costs its full compute there
        if device.type == "cuda":
            return Tiles(rows=256, batch=256, queries=16, reduce=1 << 20, keys=256, prefill=256,
                         triton=importlib.util.find_spec("triton") is not None)
        return Tiles(rows=8, batch=64, queries=8, reduce=1 << 14, keys=64, prefill=64)

    def reduce_rows(self, row: int) -> int:
        """Rows of a reduction tile whose rows hold ``row`` elements: a power of two."""
        return 1 << max(0, (self.reduce // max(row, 1)).bit_length() - 1)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    extra = -x.shape[0] % rows
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))]) if extra else x


def _by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """``fn`` over ``x`` (rows first) in contiguous tiles of exactly ``rows`` rows: the memory
    layout picks a kernel too, and a padded tile would otherwise be laid out unlike a sliced one."""
    n = x.shape[0]
    padded = _pad_rows(x, rows)
    return torch.cat([fn(padded[i:i + rows].contiguous()) for i in range(0, padded.shape[0], rows)])[:n]


def _layout_like(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x`` contiguous, or contiguous as its last two dims' transpose (``transposed``)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2) if transposed else x.contiguous()


def _trailing(x: torch.Tensor, dims: list[int] | int | None) -> int | None:
    """How many trailing dims ``dims`` names (None: not a reduction over trailing dims only)."""
    if dims is None or x.dim() == 0:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return None
    norm = sorted(d % x.dim() for d in dims)
    return len(norm) if norm == list(range(x.dim() - len(norm), x.dim())) else None


def _rowwise(x: torch.Tensor, inner: int, tiles: Tiles, fn: Callable[[torch.Tensor], torch.Tensor],
             keep: int) -> torch.Tensor:
    """Apply a reduction over the last ``inner`` dims of ``x`` row-tiled; ``keep``: how many of the
    output's trailing dims belong to a row."""
    lead = x.shape[: x.dim() - inner]
    flat = x.reshape(-1, *x.shape[x.dim() - inner:])
    out = _by_rows(fn, flat, tiles.reduce_rows(flat[0].numel()))
    return out.reshape(*lead, *out.shape[out.dim() - keep:]) if keep else out.reshape(lead)


class BatchInvariantOps(TorchDispatchMode):
    """Runs matmuls and row reductions on fixed tiles (see the module docstring).

    Under inference mode (the engines decode in it) composite ops reach the mode whole, before
    autograd would have taken them apart: ``linear`` and ``matmul`` instead of ``mm``, ``softmax``
    instead of ``_softmax``, ``layer_norm``, ``rms_norm``, ``einsum``. Each is taken apart here,
    with the mode on, so that its parts come back through the handlers."""

    def __init__(self, tiles: Tiles) -> None:
        super().__init__()
        self.tiles = tiles

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            if _composite(func):
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            return func(*args, **kwargs)
        out = handler(self.tiles, *args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


def _composite(func) -> bool:
    """Whether ``func`` is made of other ops (a CompositeImplicitAutograd kernel)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd)


def _kernels(t: Tiles, *tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels take these tensors."""
    return t.triton and all(x.is_cuda and x.dtype in _TRITON_DTYPES for x in tensors)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mm(t: Tiles, a, b):
    if _kernels(t, a, b):
        from lgen.kernels import triton_ops as triton_kernels

        return triton_kernels.matmul(a, b)
    return _by_rows(lambda x: aten.mm.default(x, b), a, t.rows)


def _addmm(t: Tiles, bias, a, b, *, beta=1, alpha=1):
    if bias.dim() != 1:  # [1 or rows, N]: which, a one-row batch cannot tell; the bias is added elementwise
        return bias * beta + _mm(t, a, b) * alpha
    if _kernels(t, a, b, bias) and beta == 1 and alpha == 1:
        from lgen.kernels import triton_ops as triton_kernels

        return triton_kernels.matmul(a, b, bias)
    return _by_rows(lambda x: aten.addmm.default(bias, x, b, beta=beta, alpha=alpha), a, t.rows)


def _bmm(t: Tiles, a, b):
    if a.shape[-1] == 1:  # one product per output: nothing to sum, nothing to order
        return NotImplemented
    n, queries = a.shape[0], a.shape[1]
    transposed = b.stride(-2) == 1 and b.stride(-1) != 1  # e.g. keys given as k.transpose(1, 2): kept so
    pa, pb = _pad_rows(a, t.batch), _pad_rows(b, t.batch)
    outs = []
    for i in range(0, pa.shape[0], t.batch):  # tiles of the batch, each entry with its own b ...
        x, y = pa[i:i + t.batch], _layout_like(pb[i:i + t.batch], transposed)
        q = _pad_rows(x.transpose(0, 1), t.queries)  # ... and of its queries (the rows of a)
        parts = [aten.bmm.default(q[j:j + t.queries].transpose(0, 1).contiguous(), y)
                 for j in range(0, q.shape[0], t.queries)]
        outs.append(torch.cat(parts, dim=1)[:, :queries])
    return torch.cat(outs)[:n]


def _reduction(op, mean: bool):
    def handler(t: Tiles, x, dim=None, keepdim=False, *, dtype=None):
        inner = _trailing(x, dim)
        if inner is None or not x.is_floating_point():
            return NotImplemented
        if _kernels(t, x):
            from lgen.kernels import triton_ops as triton_kernels

            lead, row = x.shape[: x.dim() - inner], x.shape[x.dim() - inner:]
            flat = x.reshape(-1, row.numel())
            out = triton_kernels.row_sum(flat if flat.stride(1) == 1 else flat.contiguous())
            if mean:
                out = out / row.numel()
            return out.to(dtype or x.dtype).reshape(*lead, *([1] * inner if keepdim else []))
        return _rowwise(x, inner, t, lambda r: op(r, list(range(1, inner + 1)), keepdim, dtype=dtype),
                        inner if keepdim else 0)
    return handler


def _softmax(op):
    def handler(t: Tiles, x, dim, half_to_float):
        if _trailing(x, dim) != 1:
            return NotImplemented
        return _rowwise(x, 1, t, lambda r: op(r, 1, half_to_float), 1)
    return handler


def _cumsum(t: Tiles, x, dim, *, dtype=None):
    if _trailing(x, dim) != 1 or not x.is_floating_point():
        return NotImplemented
    return _rowwise(x, 1, t, lambda r: aten.cumsum.default(r, 1, dtype=dtype), 1)


def _layer_norm(t: Tiles, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    inner = len(normalized_shape)
    lead = x.shape[: x.dim() - inner]
    flat = x.reshape(-1, *normalized_shape)
    rows = t.reduce_rows(flat[0].numel())
    parts = [aten.native_layer_norm.default(r.contiguous(), normalized_shape, weight, bias, eps)
             for r in torch.split(_pad_rows(flat, rows), rows)]
    out, mean, rstd = (torch.cat([p[i] for p in parts])[: flat.shape[0]] for i in range(3))
    stats = (*lead, *([1] * inner))
    return out.reshape(x.shape), mean.reshape(stats), rstd.reshape(stats)


_HANDLERS = {
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _bmm,
    aten.sum.dim_IntList: _reduction(aten.sum.dim_IntList, mean=False),
    aten.mean.dim: _reduction(aten.mean.dim, mean=True),
    aten._softmax.default: _softmax(aten._softmax.default),
    aten._log_softmax.default: _softmax(aten._log_softmax.default),
    aten.cumsum.default: _cumsum,
    aten.native_layer_norm.default: _layer_norm,
}


def _check_attention(attention_mask: torch.Tensor | None, kwargs: dict) -> None:
    """Refuse by name what both attentions of the mode leave out: dropout, soft-capping, sinks, and
    a mask per head (:func:`lgen.decode.settle` asks before any prompt)."""
    extra = [name for name, on in (("dropout", kwargs.get("dropout")), ("soft-capped logits", kwargs.get("softcap")),
                                   ("attention sinks", kwargs.get("s_aux") is not None)) if on]
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        extra.append(f"a mask per head (shape {tuple(attention_mask.shape)})")
    if extra:
        raise UnsupportedModel(f"its attention has {' and '.join(extra)}, and the mode computes plain softmax "
                               "attention only", needs="model.batch_invariant", fix="set batch_invariant: false")


def _attention_bmm(a: torch.Tensor, b: torch.Tensor, rows: int | None) -> torch.Tensor:
    """``a @ b`` for attention's ``[entries, rows, k] x [entries, k, n]``, outside the dispatch mode:
    ``a``'s rows in tiles of ``rows`` (None: as they are), every operand contiguous. A CPU batched
    matmul computes each entry on its own, so only the rows are tiled; a decode step has one row
    count (the query heads of a key/value head), a prefill many, and they never mix (see
    :func:`lgen.decode.steppers.align_left`)."""
    with _disable_current_modes():
        b = b.contiguous()
        if rows is None:
            return torch.bmm(a.contiguous(), b)
        m = a.shape[1]
        padded = torch.cat([a, a.new_zeros(a.shape[0], -m % rows, a.shape[2])], dim=1)
        return torch.cat([torch.bmm(padded[:, i:i + rows].contiguous(), b)
                          for i in range(0, padded.shape[1], rows)], dim=1)[:, :m]


def chunked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *, tiles: Tiles, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Softmax attention whose sums over the keys run chunk by chunk from key 0, in chunks of
    ``tiles.keys``: a chunk past a row's last key adds exact zeros, so a row's result depends on
    its own keys only, not on the cache length its batch needs. Masked keys weigh exactly 0.
    ``query``: ``[rows, heads, queries, dim]``; ``key``/``value``: ``[rows, kv_heads, keys, dim]``
    (values may be of another size: multi-head latent attention)."""
    _check_attention(attention_mask, kwargs)
    rows, heads, queries, dim = query.shape
    vdim = value.shape[-1]
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    c = tiles.keys
    pad = -length % c
    if attention_mask is None:
        allowed = torch.ones(queries, length, dtype=torch.bool, device=query.device).tril(length - queries)
        allowed = allowed[None, None]
    else:
        allowed = allowed_keys(attention_mask)
    allowed = allowed.expand(rows, 1, queries, length)
    # the query heads that share a key/value head stand in the query axis: [rows * kv_heads, groups * queries, dim]
    q = query.reshape(rows * kv_heads, groups * queries, dim)
    k = torch.nn.functional.pad(key, (0, 0, 0, pad)).reshape(rows * kv_heads, length + pad, dim)
    v = torch.nn.functional.pad(value, (0, 0, 0, pad)).reshape(rows * kv_heads, length + pad, vdim)
    allowed = torch.nn.functional.pad(allowed, (0, pad), value=False)
    allowed = allowed[:, :, None].expand(rows, kv_heads, groups, queries, length + pad)
    allowed = allowed.reshape(rows * kv_heads, groups * queries, length + pad)
    chunks = range(0, length + pad, c)
    tile = None if queries == 1 else tiles.prefill  # a decode step: one shape; a prefill: fixed tiles
    scores = torch.cat([_attention_bmm(q, k[:, i:i + c].transpose(1, 2), tile) for i in chunks], dim=-1)
    scores = scores.float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)  # a max is exact in any order
    top = torch.where(torch.isfinite(top), top, 0.0)
    weights = torch.exp(scores - top)
    sums = weights.reshape(*weights.shape[:2], len(chunks), c).sum(dim=-1)  # each chunk's sum, then in order
    total = torch.zeros_like(top)
    out = torch.zeros((q.shape[0], q.shape[1], vdim), dtype=torch.float32, device=q.device)
    for n, i in enumerate(chunks):
        total = total + sums[:, :, n:n + 1]
        out = out + _attention_bmm(weights[:, :, i:i + c].to(v.dtype), v[:, i:i + c], tile).float()
    out = out / total.clamp_min(torch.finfo(torch.float32).tiny)
    out = out.to(query.dtype).reshape(rows, heads, queries, vdim).transpose(1, 2).contiguous()
    return out, None


@contextmanager
def batch_invariant(device: torch.device, tiles: Tiles | None = None) -> Iterator[Tiles]:
    """Within the block, matmuls and reductions run on fixed tiles and attention runs
    :func:`chunked_attention` (on CUDA the span kernel); both are taken away after, also on an error."""
    tiles = tiles or Tiles.for_device(device)
    spans = Spans()

    def attention(module, query, key, value, attention_mask, **kwargs):
        if _kernels(tiles, query, key, value) and attention_mask is not None and spans_take(query, value):
            _check_attention(attention_mask, kwargs)
            return span_attention(module, query, key, value, attention_mask, spans=spans,
                                  scaling=kwargs.get("scaling"))
        return chunked_attention(module, query, key, value, attention_mask, tiles=tiles, **kwargs)

    with backend.behind(lambda previous: attention), BatchInvariantOps(tiles):
        yield tiles
