"""Decode steppers: how the engines run a batch's prefill and each decode step.

A stepper owns its rows' key/value cache (the :class:`Stepper` protocol): ``prefill`` runs the
prompts and returns the first logits (repeated for each prompt's samples: the prompt runs once);
``step`` feeds one token per row and returns the next logits; ``compact`` keeps only given rows.

* :class:`EagerStepper` steps eagerly over transformers' ``DynamicCache`` (the lockstep engine).
* :class:`PoolStepper` steps a pool of rows over a :class:`lgen.decode.cache.PoolCache` of fixed
  shape, replayed from one CUDA graph; prompts are prefilled on their own (:func:`prefill`) and
  join free rows between steps (continuous batching, and every batch-invariant run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from transformers import DynamicCache

from lgen.batch import bucket
from lgen.decode import lockstep
from lgen.decode.cache import PoolCache, SlotCache, buffers, cache_argument, layout, state_buffers, states, windows
from lgen.decode.graphs import CapturedStep
from lgen.errors import UnsupportedModel
from lgen.hf.architecture import BOTH, STATE, Architecture
from lgen.kernels import backend, decoding


class Stepper(Protocol):
    """What an engine asks of the rows it decodes."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int) -> torch.Tensor:
        """Run left-padded prompts ``[g, w]``; return the first logits of their ``g * samples`` rows."""

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[rows]``); return the next logits (``[rows, vocab]``, float32)."""

    def compact(self, keep: torch.Tensor) -> torch.Tensor | None:
        """Keep the rows ``keep``; return the row each slot now holds (padding repeats one), or None
        when nothing changed."""


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
        with backend.queries(None, positions=positions):
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
        with backend.queries(None, positions=self.next_pos):
            out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                             use_cache=True, **{self.cache_arg: self.cache})
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float()


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, aligned: bool = False,
            synced: bool = False) -> tuple[torch.Tensor, SlotCache, torch.Tensor, torch.Tensor]:
    """Run left-padded prompts (``[rows, width]``) over a :class:`SlotCache` of ``width`` positions.
    Returns the first logits (``[rows, vocab]``, float32), the cache, the keys each row holds
    (``[rows, width]``, bool) and each row's next position (``[rows, 1]``). ``aligned``: the prompts
    start at position 0 and are padded on the right (see :func:`align_left`); the first logits are
    then each prompt's last token's.

    A model whose layers carry state (:func:`lgen.decode.cache.states`) runs the prompts of each
    length on their own, unpadded: a recurrent state runs through every position it is given, so
    padding would change it (unless the model masks padding its own way, which is each model's
    code, not a contract), and a prompt padded on the right would end on padding. ``synced``: ranks
    in lockstep (ZeRO-3) each run as many forwards as the rank with the most lengths."""
    lengths = attention_mask.sum(-1)
    stateful = any(states(model))
    split = stateful and not (bool((lengths == lengths[0]).all()) and bool(attention_mask.all()))
    runs = lengths.unique().tolist() if split else []
    forwards = max(len(runs), 1)
    idle = lockstep.all_max(forwards, input_ids.device) - forwards if synced and stateful else 0
    if not split:
        out = _prefill(model, input_ids, attention_mask, aligned=aligned)
    else:
        out = _by_length(model, input_ids, attention_mask, runs, aligned=aligned)
    for _ in range(idle):
        lockstep.idle_forward(model, input_ids.device)
    return out


def _by_length(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, runs: list[int], *,
               aligned: bool) -> tuple[torch.Tensor, SlotCache, torch.Tensor, torch.Tensor]:
    """:func:`prefill` of the prompts of each length in ``runs`` on their own, unpadded, gathered
    into one cache laid out as a padded prefill lays it out."""
    rows, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    logits, cache = None, _slot_cache(model, rows, width, device=input_ids.device)
    for length in runs:
        sel = (lengths == length).nonzero().flatten()
        cols = slice(0, length) if aligned else slice(width - length, width)
        part, sub, _, _ = _prefill(model, input_ids[sel, cols], attention_mask[sel, cols])
        logits = part.new_empty((rows, part.shape[1])) if logits is None else logits
        logits[sel] = part
        for whole, piece in zip((*cache.k, *cache.v), (*sub.k, *sub.v)):
            if whole is not None:
                whole[sel, :, cols] = piece
        for whole, piece in zip(cache.state_tensors(), sub.state_tensors()):
            whole[sel] = piece
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return logits, cache, attention_mask.bool(), positions[:, -1:] + 1


def _slot_cache(model: torch.nn.Module, rows: int, width: int, *, device: torch.device) -> SlotCache:
    """An empty :class:`SlotCache` of ``width`` positions (and states) for ``rows`` rows."""
    k, v = buffers(layout(model), rows, width, dtype=next(model.parameters()).dtype, device=device)
    conv, recurrent = state_buffers(states(model), rows, device=device)
    return SlotCache(k, v, torch.arange(width, device=device), conv=conv, recurrent=recurrent)


def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             aligned: bool = False) -> tuple[torch.Tensor, SlotCache, torch.Tensor, torch.Tensor]:
    """:func:`prefill` of one padded batch."""
    rows, width = input_ids.shape
    cache = _slot_cache(model, rows, width, device=input_ids.device)
    allowed = attention_mask.bool()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with (torch.compiler.set_stance("force_eager"), _last_tokens(model, attention_mask, aligned),
          backend.use(model), backend.queries(cache.write_at[None].expand(rows, width), positions=positions)):
        out = model(input_ids=input_ids, attention_mask=allowed, position_ids=positions, use_cache=True,
                    logits_to_keep=0 if aligned else 1, **{cache_argument(model): cache})
    logits = out.logits[:, -1, :].float()
    return logits, cache, allowed, positions[:, -1:] + 1


def align_left(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts moved to start at position 0 (padded on the right instead), so that a
    prompt sits in the cache where it would sit alone (:mod:`lgen.kernels.invariant`). At least 2 wide: a
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


class PoolStepper(CapturedStep):
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
    ``synced``: ranks in lockstep (ZeRO-3) run as many prefill forwards each (:func:`prefill`).
    """

    def __init__(self, model: torch.nn.Module, *, rows: int, length: int, graph: bool, aligned: bool = False,
                 synced: bool = False) -> None:
        self.model, self.length, self.graph, self.aligned, self.synced = model, length, graph, aligned, synced
        self.cache_arg = cache_argument(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        shapes = layout(model)
        self.windows, self.attends = windows(shapes), any(s is not None for s in shapes)
        k, v = buffers(shapes, rows, length, dtype=self.dtype, device=self.device)
        conv, recurrent = state_buffers(states(model), rows, device=self.device)
        self._setup(PoolCache(k, v, torch.zeros(rows, dtype=torch.long, device=self.device), conv=conv,
                              recurrent=recurrent),
                    torch.zeros((rows, length), dtype=torch.bool, device=self.device),
                    torch.zeros((rows, 1), dtype=torch.long, device=self.device))

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def states(self) -> list[torch.Tensor]:
        """Every row's conv and recurrent states (a step updates them in place)."""
        return self.cache.state_tensors()

    def _setup(self, cache: PoolCache, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Static buffers (``mask``: the keys each row holds, ``[rows, length]``); the step is
        captured at the next ``step``."""
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
        logits, cache, mask, next_pos = prefill(self.model, input_ids, attention_mask, aligned=self.aligned,
                                                synced=self.synced)
        prompt = torch.arange(input_ids.shape[0], device=self.device).repeat_interleave(samples)  # each slot's
        for k, v, pk, pv in zip(self.cache.k, self.cache.v, cache.k, cache.v):  # prompt, copied once
            if k is not None:
                k[slots, :, :width] = pk[prompt]
                v[slots, :, :width] = pv[prompt]
        for state, fresh in zip(self.cache.state_tensors(), cache.state_tensors()):
            state[slots] = fresh[prompt]
        self.mask[slots] = False
        self.mask[slots, :width] = mask[prompt]
        self.write_at[slots] = attention_mask.sum(-1)[prompt] if self.aligned else width
        self.next_pos[slots] = next_pos[prompt]
        return logits[prompt]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int) -> torch.Tensor:
        """Admit one batch into all the rows (the compact engine's use)."""
        return self.admit(torch.arange(self.rows, device=self.device), input_ids, attention_mask, samples)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.rows, device=self.device)
        self.token.copy_(token[:, None])
        self.mask[rows, self.write_at] = True  # each new token sees itself
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


def pool_trouble(model: torch.nn.Module, *, invariant: bool = False) -> str | None:
    """Why a pool cannot decode ``model`` (None: it can), found by trying: two rows of different
    lengths are prefilled and step twice, eagerly, before any prompt (in the batch-invariant mode
    with ``invariant``). What the architecture check before loading cannot see shows here: a model
    that uses the cache's length while decoding (:class:`lgen.decode.cache.PoolCache`), asks the
    cache for something it does not have, keeps a layer's state itself (:func:`_state_outside`), or
    has attention the invariant mode does not compute."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3], [0, 2, 3]], device=device)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], device=device)
    try:
        outside = _state_outside(model)
        if outside:
            return outside
        with torch.inference_mode(), decoding(model, invariant=invariant, spans=False, packed=False):
            pool = PoolStepper(model, rows=2, length=6, graph=False, aligned=invariant)
            logits = pool.prefill(ids, mask, 1)
            for _ in range(2):
                logits = pool.step(logits.argmax(-1))
    except UnsupportedModel as err:
        if err.needs != UnsupportedModel.ENGINE:  # a setting's refusal (the invariant mode's), not the engine's
            raise
        return err.what
    except AttributeError as err:
        if not isinstance(getattr(err, "obj", None), SlotCache):
            raise
        return f"it asks the cache for {err.name!r}, which a pool's cache does not have"
    return None


def _state_outside(model: torch.nn.Module) -> str | None:
    """Why a model's state layers cannot be held in a pool: its config names a layer that carries
    state, and the probe forward saw the layer keep none in the cache (RecurrentGemma keeps its
    states on its modules and zeroes them whenever the number of rows changes)."""
    kinds = Architecture.of(model.config).layers or ()
    held = states(model)
    outside = [i for i, kind in enumerate(kinds) if kind in (*STATE, *BOTH) and (i >= len(held) or held[i] is None)]
    if not outside:
        return None
    return (f"its state layers ({', '.join(map(str, outside))}) keep their state themselves, not in the cache, "
            "where a pool cannot hold each row's")
