"""Key/value caches of fixed shape, written at positions held on the device, so that a decode step
depends on no host value and can be captured once as a CUDA graph (:mod:`lgen.decode.graphs`).

Each layer's keys and values take the shape the model gives them, read from one probe forward
(:func:`layout`), not from config fields: a layer's heads and head size may differ from the
next one's (Gemma 4's global layers), keys from values (multi-head latent attention caches a
compressed latent and a rotary part), and a layer may keep nothing (one that reads another
layer's cache).

A layer may also carry state of fixed size per row (linear attention, state-space and convolution
layers: a conv state and a recurrent state, each possibly several): the probe reads their shapes
and dtypes too (:class:`StateShape`), and the cache holds them per row beside the keys and values,
through the same methods transformers' own cache offers those layers (``get_conv_state``,
``update_recurrent_state``, ``has_previous_state``, ...).
"""

from __future__ import annotations

import inspect
import math
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


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True)
class StateShape:
    """One layer's states of fixed size per row, each per state index (None: the layer keeps no
    such state at that index): the shape of one row's conv and recurrent state, and its dtype."""

    conv: tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]
    recurrent: tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]

    @property
    def bytes(self) -> int:
        """Bytes one row's states take in this layer."""
        return sum(math.prod(shape) * dtype.itemsize
                   for shape, dtype in (s for s in (*self.conv, *self.recurrent) if s is not None))


@dataclass(frozen=True)
class _Probe:
    keys: tuple[LayerShape | None, ...]
    states: tuple[StateShape | None, ...]


_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, _Probe] = weakref.WeakKeyDictionary()


def layout(model: torch.nn.Module) -> tuple[LayerShape | None, ...]:
    """Each cache layer's :class:`LayerShape` (None: the layer keeps no keys and values), as the
    model writes them on this rank (a tensor-parallel rank holds its share of the heads): one
    forward of one token over transformers' own cache for the model, once per model. Every rank of
    a group must ask together (the forward is a collective under tensor parallelism and ZeRO-3)."""
    return _probe(model).keys


def states(model: torch.nn.Module) -> tuple[StateShape | None, ...]:
    """Each cache layer's :class:`StateShape` (None: the layer carries no state), from the same
    probe as :func:`layout`."""
    return _probe(model).states


def _row_shape(state: object) -> tuple[tuple[int, ...], torch.dtype] | None:
    if isinstance(state, (list, tuple)):  # a prefill's history of recurrent states: the last one
        state = state[-1] if state else None
    return (tuple(state.shape[1:]), state.dtype) if isinstance(state, torch.Tensor) else None


def _probe(model: torch.nn.Module) -> _Probe:
    if model in _PROBES:
        return _PROBES[model]
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    takes = inspect.signature(model.forward).parameters
    extra = {"position_ids": token} if "position_ids" in takes else {}
    try:
        # as decoding runs it (or as the model does, without the lgen backend)
        with torch.inference_mode(), backend.queries(None, positions=token):
            model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=True,
                  **{cache_argument(model): cache}, **extra)
    except ValueError as err:  # a model that refuses transformers' own cache (MiniMax keeps a class of its own)
        if "cache" not in str(err).lower():
            raise
        raise UnsupportedModel(f"it does not run over transformers' DynamicCache ({str(err).splitlines()[0]})") from err
    shapes, carried = [], []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or not isinstance(values, torch.Tensor):
            shapes.append(None)
        else:
            window = getattr(layer, "sliding_window", None)
            shapes.append(LayerShape(key_heads=keys.shape[1], key_dim=keys.shape[3], value_heads=values.shape[1],
                                     value_dim=values.shape[3], window=int(window) if window else None))
        count = getattr(layer, "number_of_states", 0)
        state = StateShape(tuple(_row_shape(layer.conv_states[i]) for i in range(count)),
                           tuple(_row_shape(layer.recurrent_states[i]) for i in range(count)))
        carried.append(state if any(s is not None for s in (*state.conv, *state.recurrent)) else None)
    _PROBES[model] = _Probe(tuple(shapes), tuple(carried))
    return _PROBES[model]


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


def state_buffers(shapes: tuple[StateShape | None, ...], rows: int, *,
                  device: torch.device) -> tuple[list[list[torch.Tensor | None]], list[list[torch.Tensor | None]]]:
    """Zeroed conv and recurrent states for ``rows`` rows: per layer, per state index."""
    def zeros(kind: tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]) -> list[torch.Tensor | None]:
        return [None if s is None else torch.zeros((rows, *s[0]), dtype=s[1], device=device) for s in kind]

    return ([[] if s is None else zeros(s.conv) for s in shapes],
            [[] if s is None else zeros(s.recurrent) for s in shapes])


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
    A prefill's cache starts empty: its length is 0, and its layers have no previous state.

    ``conv`` and ``recurrent``: each layer's states per state index (``[rows, ...]``, empty: the
    layer carries none), written in place so that their addresses stay fixed; a layer has a
    previous state once a prefill wrote it (every layer of a pool's cache has one), as
    transformers' ``LinearAttentionLayer`` counts it."""

    is_compileable = True

    def __init__(self, k: list[torch.Tensor | None], v: list[torch.Tensor | None], write_at: torch.Tensor, *,
                 conv: list[list[torch.Tensor | None]] | None = None,
                 recurrent: list[list[torch.Tensor | None]] | None = None, previous: bool = False) -> None:
        self.k, self.v, self.write_at = k, v, write_at
        self.length = next((t.shape[2] for t in k if t is not None), 0)
        self.conv = conv if conv is not None else [[] for _ in k]
        self.recurrent = recurrent if recurrent is not None else [[] for _ in k]
        self.previous = previous
        self._written: set[tuple[str, int, int]] = set()  # (kind, layer, state) a prefill has written

    @property
    def layers(self) -> list[_Layer]:
        return [_Layer(k, v) for k, v in zip(self.k, self.v)]

    def __len__(self) -> int:
        return len(self.k)

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

    def state_tensors(self) -> list[torch.Tensor]:
        """Every layer's conv and recurrent states, in one order for every cache of the model (the
        probe's), so that two caches' lists pair up."""
        return [s for layer in (*self.conv, *self.recurrent) for s in layer if s is not None]

    def _state(self, kind: str, layer_idx: int, state_idx: int) -> torch.Tensor:
        states = (self.conv if kind == "conv" else self.recurrent)[layer_idx]
        if state_idx >= len(states) or states[state_idx] is None:
            raise RuntimeError(f"layer {layer_idx} wrote a {kind} state {state_idx}, and the probe forward saw it "
                               "keep none")
        return states[state_idx]

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if self.previous:
            return True
        if layer_idx is None:  # transformers asks of its last stateful layer
            stateful = [i for i, c in enumerate(self.conv) if c or self.recurrent[i]]
            if not stateful:
                raise ValueError("has_previous_state asks of state layers, and this model has none")
            layer_idx = stateful[-1]
        count = max(len(self.conv[layer_idx]), len(self.recurrent[layer_idx]))
        wanted = range(count) if state_idx is None else [state_idx]
        return all(("conv", layer_idx, i) in self._written for i in wanted)  # as transformers counts it

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        if not self.has_previous_state(layer_idx, state_idx):
            return None
        return self._state("conv", layer_idx, state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        if not self.has_previous_state(layer_idx, state_idx):
            return None
        if not self.previous and ("recurrent", layer_idx, state_idx) not in self._written:
            return None  # as transformers' layer: a recurrent state not yet written is None
        return self._state("recurrent", layer_idx, state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          **kwargs) -> torch.Tensor:
        """Keep the last positions of ``conv_states`` (``[rows, channels, tokens]``), after the
        previous state if there is one; return what the convolution sees."""
        state = self._state("conv", layer_idx, state_idx)
        if self.has_previous_state(layer_idx, state_idx):
            full = torch.cat([state, conv_states], dim=-1)
        else:
            full = conv_states
            if full.shape[-1] < state.shape[-1]:
                full = torch.nn.functional.pad(full, (state.shape[-1] - full.shape[-1], 0))
        state.copy_(full[..., -state.shape[-1]:])
        self._written.add(("conv", layer_idx, state_idx))
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor | list[torch.Tensor], layer_idx: int,
                               state_idx: int = 0, **kwargs) -> torch.Tensor:
        state = self._state("recurrent", layer_idx, state_idx)
        state.copy_(recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[-1])
        self._written.add(("recurrent", layer_idx, state_idx))
        return state

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        """transformers counts tokens per stateful layer; lgen keeps positions of its own."""

    def select(self, rows: torch.Tensor) -> SlotCache:
        return type(self)([None if k is None else k[rows] for k in self.k],
                          [None if v is None else v[rows] for v in self.v], self.write_at,
                          conv=[[None if s is None else s[rows] for s in c] for c in self.conv],
                          recurrent=[[None if s is None else s[rows] for s in r] for r in self.recurrent],
                          previous=self.previous)


class PoolCache(SlotCache):
    """A :class:`SlotCache` whose rows are written each at its own position (``write_at[row]``):
    rows of a pool joined at different times and are at different lengths, so the cache has no
    one length or query offset to tell (:class:`_RowLengths`; the masks lgen makes do not ask, so
    a model that does computes positions from it), and every layer has a previous state."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "previous": True})

    def get_seq_length(self, layer_idx: int = 0) -> _RowLengths:
        return _RowLengths()

    def get_query_offset(self, layer_idx: int = 0) -> _RowLengths:
        return _RowLengths()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._layer(layer_idx)
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        k[rows, :, self.write_at] = key_states[:, :, 0]
        v[rows, :, self.write_at] = value_states[:, :, 0]
        return k, v
