"""lgen as a transformers attention implementation: while an engine decodes, a model's attention
layers call the function registered under the name ``lgen``, and its mask functions
(``create_causal_mask``, ``create_sliding_window_causal_mask``, ``create_chunked_causal_mask``,
...) build their masks through the mask function registered beside it.

Why: a pool row sits in a cache of fixed length, its prompt left-padded at ``[0, w)`` and its
tokens at ``w, w + 1, ...``, each row at its own place, so the query of a decode step is at a
different cache index in every row. transformers' mask functions assume one query offset for the
whole batch; here each layer type's own rule (causal, a sliding window of ``w`` keys, chunks of
``c`` keys counted from the row's first token, bidirectional image spans, ...) is evaluated at
each row's own query index (:func:`queries`), so every layer gets the mask the model means for it,
whatever the model's layer types::

    row 0 (3 pad, prompt of 5, 2 tokens so far), window 4, decode query at index 9:
      keys  0 1 2 3 4 5 6 7 8 9
      full  . . . x x x x x x x
      slide . . . . . . x x x x

What the function computes is the model's own attention (the one its configured implementation
names, its eager function included), unless a decode kernel stands in front of it (:func:`behind`:
the packed or span decode attention, or the batch-invariant attention).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "lgen"


class _State:
    """What the registered functions read while a model runs under :data:`NAME`: the model's own
    attention (``base``), a decode kernel standing in front of it (``front``), the cache index of
    each row's queries (``queries``, ``[rows, q]``; None: the last ``q`` keys, as transformers lays
    a dense cache out) and their positions (``positions``), the layers whose decode steps see a
    window of keys (``windows``), and the layers whose query temperature lgen applies (``tuned``)."""

    def __init__(self) -> None:
        self.base: Callable | None = None
        self.front: Callable | None = None
        self.queries: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.windows: dict[int, int] = {}
        self.tuned: set[int] = set()  # ids of attention modules (_temperature)
        self.windowed: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # this forward's


_STATE = _State()


def _eager(module: torch.nn.Module) -> Callable:
    """The eager attention of ``module``'s modeling file (what ``get_interface`` falls back to)."""
    function = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward beside it to stand in for")
    return function


def own_attention(implementation: str) -> Callable:
    """The attention a model configured with ``implementation`` runs (its eager function for
    ``eager``)."""
    if implementation == "eager" or implementation not in ALL_ATTENTION_FUNCTIONS:
        return lambda module, *args, **kwargs: _eager(module)(module, *args, **kwargs)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function behind :data:`NAME`: a decode kernel if one stands in front, else the model's own."""
    function = _STATE.front or _STATE.base
    if function is None:
        raise RuntimeError(f"attention implementation {NAME!r} used outside lgen.kernels.backend.use")
    window = _STATE.windows.get(getattr(module, "layer_idx", None))
    if window and query.shape[2] == 1 and attention_mask is not None and _STATE.queries is not None:
        attention_mask = _window(attention_mask, window)
    if id(module) in _STATE.tuned:
        query = _temperature(module, query)
    return function(module, query, key, value, attention_mask, **kwargs)


def _tuned(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention layers that scale their queries by a temperature of the query's position, which
    they count from the cache's length (Llama 4's layers without rotary embeddings: one length for
    every row, which a pool does not have)."""
    return [m for m in model.modules() if getattr(m, "attn_temperature_tuning", False)
            and not getattr(m, "use_rope", True) and hasattr(m, "floor_scale")]


def _temperature(module: torch.nn.Module, query: torch.Tensor) -> torch.Tensor:
    """``query`` (``[rows, heads, q, dim]``) scaled as ``module`` scales it, at each row's own
    positions (:func:`queries`) instead of positions counted from the cache's length."""
    if _STATE.positions is None:
        raise RuntimeError(f"{type(module).__name__} scales its queries by position, and no positions were given")
    scales = torch.log1p(torch.floor((_STATE.positions.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0
    return (query * scales[:, None, :, None]).to(query.dtype)


def _window(mask: torch.Tensor, window: int) -> torch.Tensor:
    """A decode step's ``mask`` (``[rows, 1, 1, keys]``) less the keys transformers' cache would
    have let go of: those ``window`` or more positions before each row's query. A model whose mask
    function slides already loses nothing here; one that slides by its cache alone (its mask is
    causal) gets the keys it sees under ``generate``. Made once per mask and window in a forward."""
    kept = _STATE.windowed.get((id(mask), window))
    if kept is None or kept[0] is not mask:
        keys = torch.arange(mask.shape[-1], device=mask.device)
        old = keys[None, None, None, :] <= _STATE.queries[:, None, :, None] - window
        kept = (mask, mask.masked_fill(old, torch.finfo(mask.dtype).min))
        _STATE.windowed[(id(mask), window)] = kept
    return kept[1]


def base() -> Callable:
    """The model's own attention while :func:`use` is active (what a decode kernel falls back to)."""
    if _STATE.base is None:
        raise RuntimeError(f"no model runs under attention implementation {NAME!r}")
    return _STATE.base


def mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0, kv_offset: int = 0,
         mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **kwargs: Any) -> torch.Tensor:
    """An additive mask ``[batch, 1, q_length, kv_length]`` (0 where a query may look, the dtype's
    minimum elsewhere): ``mask_function`` (the layer type's rule, from transformers) evaluated at
    each row's query indices (:func:`queries`), and the keys ``attention_mask`` (``[batch, keys]``)
    holds. Only tensor operations on device buffers: a CUDA graph that captures a step replays it."""
    _STATE.windowed.clear()  # masks are made at the start of a forward: the last one's are gone
    rows = torch.arange(batch_size, device=device)[:, None, None, None]
    heads = torch.arange(1, device=device)[None, :, None, None]
    keys = torch.arange(kv_length, device=device)[None, None, None, :] + kv_offset
    if _STATE.queries is None:
        at = (torch.arange(q_length, device=device) + q_offset)[None, None, :, None]
    else:
        if tuple(_STATE.queries.shape) != (batch_size, q_length):
            raise RuntimeError(f"queries of shape {tuple(_STATE.queries.shape)} for a mask of {batch_size} rows "
                               f"x {q_length} queries")
        at = _STATE.queries[:, None, :, None]
    allowed = mask_function(rows, heads, at, keys)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, kv_offset:kv_offset + kv_length].bool()
    allowed = allowed.expand(batch_size, 1, q_length, kv_length)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, mask)


_CONFIGS: weakref.WeakKeyDictionary[torch.nn.Module, list[Any]] = weakref.WeakKeyDictionary()


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config that some part of ``model`` reads its attention implementation from."""
    if model not in _CONFIGS:
        seen: dict[int, Any] = {}
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation_internal"):
                seen.setdefault(id(config), config)
        _CONFIGS[model] = list(seen.values())
    return _CONFIGS[model]


@contextmanager
def use(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model`` runs under :data:`NAME` (every config of its parts), computing
    its own attention; its implementation is put back after, also on an error. Re-entering for
    the model already under it changes nothing."""
    configs = _configs(model)
    if all(config._attn_implementation_internal == NAME for config in configs):
        yield
        return
    saved = [(config, config._attn_implementation_internal) for config in configs]
    own = model.config._attn_implementation
    previous = _STATE.base, _STATE.tuned
    tuned = _tuned(model)
    _STATE.base = own_attention(own if isinstance(own, str) else "sdpa")
    _STATE.tuned = {id(m) for m in tuned}
    try:
        for config, _ in saved:
            config._attn_implementation_internal = NAME
        for module in tuned:  # lgen scales their queries (_temperature)
            module.attn_temperature_tuning = False
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value
        for module in tuned:
            module.attn_temperature_tuning = True
        _STATE.base, _STATE.tuned = previous


@contextmanager
def queries(index: torch.Tensor | None, *, positions: torch.Tensor,
            windows: dict[int, int] | None = None) -> Iterator[None]:
    """Within the block, the masks take row r's queries at cache indices ``index[r]`` (``[rows,
    q]``; None: the last ``q`` of a dense cache), at ``positions[r]``, and a decode step of layer i
    sees only the last ``windows[i]`` positions (the layers transformers' own cache keeps a window
    of, :func:`lgen.decode.cache.windows`)."""
    previous = _STATE.queries, _STATE.positions, _STATE.windows
    _STATE.queries, _STATE.positions, _STATE.windows = index, positions, windows or {}
    try:
        yield
    finally:
        _STATE.queries, _STATE.positions, _STATE.windows = previous
        _STATE.windowed.clear()


@contextmanager
def behind(function: Callable[[Callable], Callable] | None) -> Iterator[None]:
    """Within the block, ``function(previous)`` stands in front of the attention (``previous``: what
    stood there before, or the model's own); put back after, also on an error. None: nothing."""
    if function is None:
        yield
        return
    previous = _STATE.front
    _STATE.front = function(lambda *args, **kwargs: (previous or base())(*args, **kwargs))
    try:
        yield
    finally:
        _STATE.front = previous

