"""lgen's CUDA kernels (Triton): batch-invariant matmul and row sums, and attention over spans.

Each kernel computes one row's result with a fixed blocking that never depends on the number of
rows: one tile configuration (no split-K, no autotuning), reductions in a fixed order from index
0. A row's result is then the same alone and in any batch (:mod:`lgen.kernels.invariant`), and the kernels
read only what a row needs.

* :func:`matmul`: ``a @ b (+ bias)`` in float32 accumulation, tiles of 64 x 128 x 64.
* :func:`row_sum`: sums over the last dim, one program per row.
* :func:`attention`: softmax attention over key blocks of 64 aligned to key 0 (online softmax), with
  grouped key/value heads. Each query reads only the blocks of its span of keys, not the whole
  static cache: every decode step on CUDA uses it (:mod:`lgen.kernels.attention`), not only the
  batch-invariant mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BM, _BN, _BK = 64, 128, 64


# Triton compiles another kernel for an integer argument divisible by 16 (or equal to 1), and the
# two may round differently: arguments that change with the batch are left unspecialised.
@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(a, b, c, bias, M, N, K, sam, sak, sbk, sbn, scm, scn, HAS_BIAS: tl.constexpr,
                   IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(a + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        y = tl.load(b + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if IEEE:  # float32 inputs: float32 products, not TF32
            acc = tl.dot(x, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(c.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b + bias`` for 2-d ``a`` ``[M, K]`` and ``b`` ``[K, N]`` (any strides), ``bias`` ``[N]``."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, _BM), triton.cdiv(n, _BN))
    _matmul_kernel[grid](a, b, c, bias if bias is not None else c, m, n, k, a.stride(0), a.stride(1),
                         b.stride(0), b.stride(1), c.stride(0), c.stride(1), HAS_BIAS=bias is not None,
                         IEEE=a.dtype == torch.float32, BM=_BM, BN=_BN, BK=_BK, num_warps=4, num_stages=3)
    return c


@triton.jit
def _row_sum_kernel(x, out, N, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        acc += tl.load(x + row * stride + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
    tl.store(out + row, tl.sum(acc, axis=0))


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """float32 sums over the last dim of a 2-d tensor whose rows are contiguous."""
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    _row_sum_kernel[(rows,)](x, out, n, x.stride(0), BLOCK=256, num_warps=4)
    return out


def _attention_fn(q, k, v, bias, starts, ends, out, scale, Q, G, L, sqb, sqh, sqt, skb, skh, skl, svb, svh, svl,
                  sbb, sbt, seb, set_, sob, soh, sot, KVH: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // KVH
    h = pid_bh % KVH
    rm = pid_m * BM + tl.arange(0, BM)  # rows: (group g, query t) of this key/value head
    g = rm // Q
    t = rm % Q
    live = rm < G * Q
    d = tl.arange(0, DP)  # the head dim, padded to a power of two
    dd = d < D
    head = h * G + g
    qv = tl.load(q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=live[:, None] & dd[None, :],
                 other=0.0)
    # the blocks that hold the block's queries' keys; blocks stay aligned to key 0, and a block wholly
    # before a query's span adds exact zeros to it, so skipping it changes nothing
    first = tl.min(tl.load(starts + b * seb + t * set_, mask=live, other=1 << 30), axis=0)
    stop = tl.max(tl.load(ends + b * seb + t * set_, mask=live, other=0), axis=0)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DP), dtype=tl.float32)
    rn = tl.arange(0, BN)
    for n0 in range((first // BN) * BN, stop, BN):
        keys = n0 + rn
        inside = keys < L
        kb = tl.load(k + b * skb + h * skh + keys[:, None] * skl + d[None, :], mask=inside[:, None] & dd[None, :],
                     other=0.0)
        if IEEE:
            s = tl.dot(qv, tl.trans(kb), input_precision="ieee") * scale
        else:
            s = tl.dot(qv, tl.trans(kb)) * scale
        # the mask as a bias: 0 (or the model's additive value) where a query may look, -inf elsewhere
        s += tl.load(bias + b * sbb + t[:, None] * sbt + keys[None, :], mask=live[:, None] & inside[None, :],
                     other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v + b * svb + h * svh + keys[:, None] * svl + d[None, :], mask=inside[:, None] & dd[None, :],
                     other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
        m_i = m_new
    acc = acc / tl.maximum(l_i, 1.0e-30)[:, None]
    tl.store(out + b * sob + head[:, None] * soh + t[:, None] * sot + d[None, :], acc.to(out.dtype.element_ty),
             mask=live[:, None] & dd[None, :])


# The query count and cache length change with the batch. With a head dim that is a multiple of 16
# every stride is one too, whatever the batch, so strides stay specialised (aligned, vector loads).
_SHAPES = ["Q", "L", "sbb", "sbt", "seb"]
_attention_kernel = triton.jit(do_not_specialize=_SHAPES)(_attention_fn)
_attention_kernel_any_dim = triton.jit(
    do_not_specialize=[*_SHAPES, "sqb", "sqh", "sqt", "skb", "skh", "skl", "svb", "svh", "svl", "sob", "soh", "sot"]
)(_attention_fn)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, starts: torch.Tensor,
              ends: torch.Tensor, scale: float, *, block_queries: int = 64) -> torch.Tensor:
    """Softmax attention that reads only each query's span of keys.

    ``query`` ``[B, H, Q, D]``; ``key``/``value`` ``[B, KVH, L, D]`` (last dim contiguous); ``bias``
    ``[B, Q, L]`` float32 (last dim contiguous), the mask: added to the scores, ``-inf`` where a query
    may not look; ``starts``/``ends`` ``[B, Q]`` int32: every key a query may see lies in
    ``[start, end)`` (see :class:`lgen.kernels.attention.Spans`). ``block_queries`` (a power of two, at least
    16): the (query head, query) pairs of a key/value head one program takes; the batch-invariant
    mode keeps 64 for decode steps and prefills alike, since the blocking must not depend on the
    shape, while a plain decode step, with a few query heads per key/value head, wastes less with 16.
    Returns ``[B, Q, H, D]``."""
    rows, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = torch.empty((rows, queries, heads, dim), dtype=query.dtype, device=query.device)
    bm = block_queries
    grid = (triton.cdiv(groups * queries, bm), rows * kv_heads)
    kernel = _attention_kernel if dim % 16 == 0 else _attention_kernel_any_dim
    kernel[grid](
        query, key, value, bias, starts, ends, out, scale, queries, groups, length,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), bias.stride(0), bias.stride(1), ends.stride(0),
        ends.stride(1), out.stride(0), out.stride(2), out.stride(1),
        KVH=kv_heads, D=dim, DP=max(16, triton.next_power_of_2(dim)), BM=bm, BN=64,
        IEEE=query.dtype == torch.float32, num_warps=4, num_stages=2)
    return out
