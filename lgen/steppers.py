"""Decode steppers: how the compact engine runs a batch's prefill and each decode step.

A stepper owns a batch's key/value cache. ``prefill`` runs the prompts and returns the first
logits (repeated for each prompt's samples: the prompt runs once); ``step`` feeds one token per
row and returns the next logits; ``compact`` keeps only the given rows.

* :class:`EagerStepper` steps eagerly over transformers' ``DynamicCache``.
* :class:`GraphStepper` steps over a :class:`SlotCache` of fixed shape, so a step can be captured
  once as a CUDA graph and replayed; rows leave by moving to a smaller bucket of rows.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from lgen.budget import kv_layout
from lgen.models import base_model, whole_blocks
from lgen.plan import bucket


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


def compile_layers(model: torch.nn.Module, dynamic: bool | None = None) -> int:
    """``torch.compile`` each decoder layer (the classes a transformers model lists in
    ``_no_split_modules``) for :class:`GraphStepper`'s decode steps, which then replay fused kernels.

    Compiling the layers, not the whole model, keeps the compiled code small: dynamo traces each
    layer (its cache index is a constant) and inductor's graph cache serves the copies. ``dynamic``
    is ``torch.compile``'s: by default the first batch shape compiles static and the next makes the
    sizes that changed (rows, cache length) symbolic, so later batches reuse that graph. Everything
    else runs eagerly: the prefill runs with compiled code set aside. Returns the number of layers
    compiled; raises ``ValueError`` for a model that names no decoder layer classes.
    """
    layers = whole_blocks(model)
    if not layers:
        raise ValueError(f"{type(base_model(model)).__name__} names no decoder layer classes (_no_split_modules)")
    for layer in layers:
        if layer._compiled_call_impl is None:  # a second predict on the same model keeps its graphs
            layer.compile(dynamic=dynamic)
    return len(layers)


# a compiled layer's graphs: up to 3 per layer (static, then symbolic rows, then symbolic cache length),
# all under one function, whose default limit is 8
_RECOMPILES = {"recompile_limit": 4096, "accumulated_recompile_limit": 1 << 16}


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the captures of steps that run on the default stream."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


class _CapturedStep:
    """The model's one-token step over static buffers (``token``, ``mask``, ``next_pos``,
    ``cache``), captured as a CUDA graph at its first run when ``graph``, and replayed after."""

    graph: bool
    _graph: torch.cuda.CUDAGraph | None

    def _forward(self) -> torch.Tensor:
        with torch._dynamo.config.patch(**_RECOMPILES):
            out = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.next_pos,
                             use_cache=True, **{self.cache_arg: self.cache})
        return out.logits[:, -1, :]

    def _capture(self) -> None:
        """Capture the step, after one warm-up run on the capturing stream (it compiles kernels and
        sets up library workspaces outside the capture, and writes what the replay writes).

        Unlike ``torch.cuda.graph``, no device-wide synchronize and cache flush, which would stall the
        other pools' work. A pool captures on its own CUDA stream: cuBLAS keeps a workspace per
        stream and a graph keeps the one it was captured with, so graphs captured on one stream
        must not replay at the same time on two. A step on the default stream (one batch at a
        time) captures on a side stream. Should the capture run out of memory, the allocator's
        cache is emptied (what ``torch.cuda.graph`` does every time) and it is tried once more."""
        current = torch.cuda.current_stream()
        side = current == torch.cuda.default_stream(current.device)
        stream = _capture_stream(current.device) if side else current
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self._forward()
            try:
                graph, out = self._record()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                graph, out = self._record()
        current.wait_stream(stream)
        self._graph, self._out = graph, out

    def _record(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One capture of the step on the current stream."""
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            out = self._forward()
        except BaseException:
            with contextlib.suppress(Exception):
                graph.capture_end()
            raise
        graph.capture_end()
        return graph, out

    def _run(self) -> torch.Tensor:
        """One step's logits: replayed (captured first if need be), or run eagerly."""
        if not self.graph:
            return self._forward()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._out


@contextmanager
def _last_tokens(model: torch.nn.Module, attention_mask: torch.Tensor, aligned: bool) -> Iterator[None]:
    """With prompts padded on the right (``aligned``), the output embedding sees only each row's
    last prompt token (a hook on its input: ``logits_to_keep`` takes one position per row only in
    recent transformers)."""
    if not aligned:
        yield
        return
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding to take each prompt's last token from")
    last = attention_mask.sum(-1) - 1

    def gather(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1])), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


class EagerStepper:
    """Eager steps over a ``DynamicCache``; compaction selects the live rows of the cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache_arg = cache_argument(model)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int) -> torch.Tensor:
        self.cache = DynamicCache(config=self.model.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        logits = out.logits[:, -1, :].float()
        if samples > 1:
            self.cache.batch_repeat_interleave(samples)
            logits, attention_mask, positions = (t.repeat_interleave(samples, dim=0)
                                                 for t in (logits, attention_mask, positions))
        self.mask, self.next_pos = attention_mask, positions[:, -1:] + 1
        return logits

    def compact(self, keep: torch.Tensor) -> torch.Tensor | None:
        """Keep the rows ``keep``; returns the slot of each kept row (None: nothing changed)."""
        if keep.numel() == self.mask.shape[0]:
            return None
        self.cache.batch_select_indices(keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
        return keep

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                         use_cache=True, **{self.cache_arg: self.cache})
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float()


class GraphStepper(_CapturedStep):
    """Steps over a :class:`SlotCache` replayed from a CUDA graph (``graph=False``: run eagerly, for
    tests on CPU). Rows are dropped by moving to a smaller bucket (powers of two and 1.5 times
    them: 192 -> 128 -> 96 -> ... -> ``min_rows``), with one capture per bucket; padding slots
    repeat a live row and are ignored."""

    def __init__(self, model: torch.nn.Module, max_new_tokens: int, *, graph: bool, min_rows: int = 8) -> None:
        self.model, self.max_new_tokens, self.graph, self.min_rows = model, max_new_tokens, graph, min_rows
        self.cache_arg = cache_argument(model)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int, *,
                aligned: bool = False) -> torch.Tensor:
        """``aligned``: the prompts start at position 0 and are padded on the right (see
        :func:`align_left`); the first logits are then each prompt's last token's."""
        rows, width = input_ids.shape
        device = input_ids.device
        dtype = next(self.model.parameters()).dtype
        self.length = width + self.max_new_tokens
        layers, heads, head_dim = kv_layout(self.model)
        shape = (rows, heads, self.length, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        cache = SlotCache(k, v, torch.arange(width, device=device))
        # additive masks: 0 where a query may look, the dtype's minimum elsewhere
        neg = torch.finfo(dtype).min
        allowed = attention_mask.bool()
        causal = torch.ones(width, self.length, dtype=torch.bool, device=device).tril()
        prefill_mask = allowed[:, None, None, :].expand(rows, 1, width, width)
        prefill_mask = torch.cat([prefill_mask, allowed.new_zeros(rows, 1, width, self.max_new_tokens)], dim=-1)
        prefill_mask = prefill_mask & causal | torch.eye(width, self.length, dtype=torch.bool, device=device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.compiler.set_stance("force_eager"), _last_tokens(self.model, attention_mask, aligned):
            out = self.model(input_ids=input_ids, attention_mask=torch.where(prefill_mask, 0.0, neg).to(dtype),
                             position_ids=positions, use_cache=True, logits_to_keep=0 if aligned else 1,
                             **{self.cache_arg: cache})
        logits = out.logits[:, -1, :].float()
        decode_mask = torch.cat([allowed, allowed.new_zeros(rows, self.max_new_tokens)], dim=-1)
        next_pos = positions[:, -1:] + 1
        if samples > 1:
            cache = cache.select(torch.arange(rows, device=device).repeat_interleave(samples))
            logits, decode_mask, next_pos = (t.repeat_interleave(samples, dim=0)
                                             for t in (logits, decode_mask, next_pos))
        self._setup(cache, torch.where(decode_mask, 0.0, neg).to(dtype)[:, None, None, :], next_pos,
                    torch.full((1,), width, dtype=torch.long, device=device))
        return logits

    def _setup(self, cache: SlotCache, mask: torch.Tensor, next_pos: torch.Tensor, write_at: torch.Tensor) -> None:
        """Static buffers for a bucket; its step is captured at the next ``step``."""
        self.cache = SlotCache(cache.k, cache.v, write_at)
        self.mask, self.next_pos, self.write_at = mask.contiguous(), next_pos.contiguous(), write_at
        self.token = torch.zeros((mask.shape[0], 1), dtype=torch.long, device=mask.device)
        self._graph = None

    def compact(self, keep: torch.Tensor) -> torch.Tensor | None:
        """Keep the rows ``keep`` (padded to a bucket by repeating the last); returns the row each
        slot now holds (None: the bucket stays)."""
        rows = self.mask.shape[0]
        size = bucket(int(keep.numel()), self.min_rows)
        if size >= rows:
            return None
        sel = torch.cat([keep, keep[-1:].expand(size - keep.numel())])
        self._setup(self.cache.select(sel), self.mask[sel], self.next_pos[sel], self.write_at)
        return sel

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        self.mask.index_fill_(3, self.write_at, 0.0)  # the new token sees itself
        logits = self._run()
        self.write_at.add_(1)
        self.next_pos.add_(1)
        return logits.float()


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


def align_left(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts moved to start at position 0 (padded on the right instead), so that a
    prompt sits in the cache where it would sit alone (:mod:`lgen.invariant`). At least 2 wide: a
    prefill then never has the one query of a decode step, which attention computes another way."""
    if input_ids.shape[1] == 1:
        input_ids = torch.cat([input_ids, input_ids], dim=1)
        attention_mask = torch.cat([attention_mask, torch.zeros_like(attention_mask)], dim=1)
    width = input_ids.shape[1]
    lengths = attention_mask.sum(-1, keepdim=True)
    cols = torch.arange(width, device=input_ids.device)[None, :]
    source = (cols + width - lengths).clamp(max=width - 1)
    real = cols < lengths
    return (torch.where(real, input_ids.gather(1, source), input_ids[:, :1]),
            real.to(attention_mask.dtype))


class PoolStepper(_CapturedStep):
    """A pool of ``rows`` rows over a static cache of ``length`` positions, for continuous batching:
    new prompts are prefilled on their own and join free rows (:meth:`admit`) between steps, and
    every step runs the whole pool, replayed from one CUDA graph (``graph=False``: eagerly).

    Row r's prompt, left-padded to its group's width w, sits at cache positions [0, w); its tokens
    follow at ``write_at[r]`` = w, w + 1, ...; its mask opens the positions it has written. With
    ``aligned`` (batch-invariant decoding) the prompt starts at position 0 instead and its tokens
    follow at its own length, as if it were alone (:func:`align_left`). A free
    row computes garbage that nobody reads. With a graph the pool keeps its size while prompts come
    (one capture), and a draining pool moves to smaller buckets (8, 12, 16, 24, ...); eagerly (on a
    CPU, where a free row costs as much as a live one) it holds just the live rows (:meth:`select`).
    """

    def __init__(self, model: torch.nn.Module, *, rows: int, length: int, graph: bool, aligned: bool = False) -> None:
        self.model, self.length, self.graph, self.aligned = model, length, graph, aligned
        self.cache_arg = cache_argument(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.neg = torch.finfo(self.dtype).min
        layers, heads, head_dim = kv_layout(model)
        shape = (rows, heads, length, head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self._setup(PoolCache(k, v, torch.zeros(rows, dtype=torch.long, device=self.device)),
                    torch.full((rows, 1, 1, length), self.neg, dtype=self.dtype, device=self.device),
                    torch.zeros((rows, 1), dtype=torch.long, device=self.device))

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def _setup(self, cache: PoolCache, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Static buffers; the step is captured at the next ``step``."""
        self.cache, self.write_at = cache, cache.write_at.contiguous()
        self.cache.write_at = self.write_at
        self.mask, self.next_pos = mask.contiguous(), next_pos.contiguous()
        self.token = torch.zeros((mask.shape[0], 1), dtype=torch.long, device=self.device)
        self._graph = None

    def admit(self, slots: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              samples: int) -> torch.Tensor:
        """Prefill a group of prompts (``[g, w]``, left-padded) on its own, put its ``samples`` rows
        per prompt in ``slots`` (``g * samples`` of them), and return their first logits."""
        if self.aligned:
            input_ids, attention_mask = align_left(input_ids, attention_mask)
        width = input_ids.shape[1]
        if width > self.length:
            raise ValueError(f"a prompt group of width {width} does not fit a pool of {self.length} positions")
        prefill = GraphStepper(self.model, 0, graph=False)
        logits = prefill.prefill(input_ids, attention_mask, 1, aligned=self.aligned)
        prompt = torch.arange(input_ids.shape[0], device=self.device).repeat_interleave(samples)  # each slot's
        for k, v, pk, pv in zip(self.cache.k, self.cache.v, prefill.cache.k, prefill.cache.v):  # prompt, copied once
            k[slots, :, :width] = pk[prompt, :, :width]
            v[slots, :, :width] = pv[prompt, :, :width]
        self.mask[slots] = self.neg
        self.mask[slots, :, :, :width] = prefill.mask[prompt, :, :, :width]
        self.write_at[slots] = attention_mask.sum(-1)[prompt] if self.aligned else width
        self.next_pos[slots] = prefill.next_pos[prompt]
        return logits[prompt]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int) -> torch.Tensor:
        """Admit one batch into all the rows (the compact engine's use)."""
        return self.admit(torch.arange(self.rows, device=self.device), input_ids, attention_mask, samples)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.rows, device=self.device)
        self.token.copy_(token[:, None])
        self.mask[rows, 0, 0, self.write_at] = 0.0  # each new token sees itself
        logits = self._run()
        self.write_at.add_(1).clamp_(max=self.length - 1)  # a free row runs on; it must stay in bounds
        self.next_pos.add_(1)
        return logits.float()

    def select(self, sel: torch.Tensor) -> None:
        """Rows ``sel`` of the pool become the pool (a row may repeat)."""
        cache = self.cache.select(sel)
        cache.write_at = self.write_at[sel]
        self._setup(cache, self.mask[sel], self.next_pos[sel])

    def compact(self, keep: torch.Tensor, least: int = 8) -> torch.Tensor | None:
        """Move the rows ``keep`` to a smaller pool: with a CUDA graph one of a few sizes (a bucket;
        padding repeats the last row), eagerly just those rows. Returns the row each new slot holds
        (None: the pool stays)."""
        size = bucket(int(keep.numel()), least) if self.graph else int(keep.numel())
        if size >= self.rows or keep.numel() == 0:
            return None
        sel = torch.cat([keep, keep[-1:].expand(size - keep.numel())])
        self.select(sel)
        return sel
