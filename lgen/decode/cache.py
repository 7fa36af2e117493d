"""Key/value caches of fixed shape, written at positions held on the device, so that a decode step
depends on no host value and can be captured once as a CUDA graph (:mod:`lgen.decode.graphs`).

Each layer's keys and values take the shape the model gives them, read from one probe forward
(:func:`layout`), not from config fields: a layer's heads and head size may differ from the
next one's (Gemma 4's global layers), keys from values (multi-head latent attention caches a
compressed latent and a rotary part), and a layer may keep nothing (one that reads another
layer's cache).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lgen.errors import UnsupportedModel
from lgen.hf.models import base_model
from lgen.kernels import backend


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its cache: ``cache`` in the transformers
    releases that deprecate ``past_key_values`` (removed in 5.40), ``past_key_values`` before."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class LayerShape:
    """One layer's cached keys and values per token (``[key_heads, key_dim]``, ``[value_heads,
    value_dim]``), and the keys transformers' own cache keeps for it (``window``: the last
    ``window`` positions a decode step sees; None: all)."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    window: int | None = None

    @property
    def elements(self) -> int:
        """Key and value elements one token takes in this layer."""
        return self.key_heads * self.key_dim + self.value_heads * self.value_dim


_LAYOUTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[LayerShape | None, ...]] = weakref.WeakKeyDictionary()


def layout(model: torch.nn.Module) -> tuple[LayerShape | None, ...]:
    """Each cache layer's :class:`LayerShape` (None: the layer keeps nothing), as the model writes
    them on this rank (a tensor-parallel rank holds its share of the heads): one forward of one
    token over transformers' own cache for the model, once per model. Every rank of a group must
    ask together (the forward is a collective under tensor parallelism and ZeRO-3)."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    takes = inspect.signature(model.forward).parameters
    extra = {"position_ids": token} if "position_ids" in takes else {}
    with torch.inference_mode(), backend.queries(None, positions=token):  # as decoding runs it, or as the model does
        model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=True,
              **{cache_argument(model): cache}, **extra)
    shapes = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or not isinstance(values, torch.Tensor):
            shapes.append(None)
        else:
            window = getattr(layer, "sliding_window", None)
            shapes.append(LayerShape(keys.shape[1], keys.shape[3], values.shape[1], values.shape[3],
                                     int(window) if window else None))
    _LAYOUTS[model] = tuple(shapes)
    return _LAYOUTS[model]


def windows(shapes: tuple[LayerShape | None, ...]) -> dict[int, int]:
    """Layer index -> the positions its decode steps see, for the layers transformers' cache keeps
    a window of (its sliding-window layer: the last ``window - 1`` keys, and the step's own)."""
    return {i: s.window for i, s in enumerate(shapes) if s is not None and s.window}


def buffers(shapes: tuple[LayerShape | None, ...], rows: int, length: int, *, dtype: torch.dtype,
            device: torch.device) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Zeroed key and value buffers of ``length`` positions for ``rows`` rows, per layer."""
    def zeros(heads: int, dim: int) -> torch.Tensor:
        return torch.zeros((rows, heads, length, dim), dtype=dtype, device=device)

    return ([None if s is None else zeros(s.key_heads, s.key_dim) for s in shapes],
            [None if s is None else zeros(s.value_heads, s.value_dim) for s in shapes])


class _Layer:
    """A layer of a :class:`SlotCache` as transformers' cache layers show it (``keys``, ``values``,
    ``is_initialized``), for model code that reads a layer's cache directly."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        self.is_initialized = keys is not None
        self.keys = keys if keys is not None else torch.empty(0)
        self.values = values if values is not None else torch.empty(0)


class _RowLengths:
    """What a pool's cache answers when asked its length: its rows are at different lengths, so any
    use of the answer (arithmetic, a comparison, a conversion) is refused by name. A model that
    asks only to fill in positions it was given anyway never uses it."""

    def _refuse(self, *args: object) -> None:
        raise UnsupportedModel("it uses the cache's length while decoding, and the rows of a pool are each at a "
                               "length of their own")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = __rfloordiv__ = _refuse
    __truediv__ = __rtruediv__ = __mod__ = __index__ = __int__ = __float__ = __bool__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = _refuse


class SlotCache:
    """A KV cache of fixed shape per layer (``[rows, heads, length, dim]``) written at the
    positions held in the device tensor ``write_at``: nothing in a decode step depends on host
    values, so the step can be captured once as a CUDA graph and replayed. It implements the part
    of transformers' ``Cache`` interface that attention layers and mask functions call: every
    layer sees all ``length`` positions, and the masks (:mod:`lgen.kernels.backend`) say which.
    A prefill's cache starts empty: its length is 0."""

    is_compileable = True

    def __init__(self, k: list[torch.Tensor | None], v: list[torch.Tensor | None], write_at: torch.Tensor) -> None:
        self.k, self.v, self.write_at = k, v, write_at
        self.length = next(t.shape[2] for t in k if t is not None)

    @property
    def layers(self) -> list[_Layer]:
        return [_Layer(k, v) for k, v in zip(self.k, self.v)]

    def _layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer_idx], self.v[layer_idx]
        if k is None or v is None:
            raise RuntimeError(f"layer {layer_idx} wrote to the cache, and the probe forward saw it keep nothing")
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._layer(layer_idx)
        k.index_copy_(2, self.write_at, key_states)
        v.index_copy_(2, self.write_at, value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return self.length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def select(self, rows: torch.Tensor) -> SlotCache:
        return type(self)([None if k is None else k[rows] for k in self.k],
                          [None if v is None else v[rows] for v in self.v], self.write_at)


class PoolCache(SlotCache):
    """A :class:`SlotCache` whose rows are written each at its own position (``write_at[row]``):
    rows of a pool joined at different times and are at different lengths, so the cache has no
    one length to tell (:class:`_RowLengths`)."""

    def get_seq_length(self, layer_idx: int = 0) -> _RowLengths:
        return _RowLengths()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._layer(layer_idx)
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        k[rows, :, self.write_at] = key_states[:, :, 0]
        v[rows, :, self.write_at] = value_states[:, :, 0]
        return k, v
