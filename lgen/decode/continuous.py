"""Continuous batching: a pool of rows that new prompts join as finished rows leave.

The compact engine's batch is a unit of work: it starts together and ends when its longest row
ends. Here the unit is a *stream* of prompt groups (:mod:`lgen.data.plan`): the first groups fill a pool
of rows; every ``compact_every`` steps finished rows leave, and once a group's worth of rows is
free the next group is prefilled and joins. ``per_device_batch_size`` is the number of prompts
prefilled together; how many rows decode together is the pool's size, set by the memory budget::

    step:       0 ....... 40 ....... 80 ....... 120 ...
    pool:       [g1 g2 g3 g4]  g1 ends  [g5 g2 g3 g4]  ...   (the pool stays full)

Which rows share a step depends only on the stream, never on the number of ranks: a rank runs
whole streams, each in a pool of its own. Once a stream's groups are all in, its pool *drains*
beside the next stream's *filling* pool, as long as the memory budget holds both; on a GPU each
pool runs on a CUDA stream of its own, so while the host waits on one pool the GPU runs the other.
A pool decodes only to make room for its own next group or to drain, so its timeline, and with it
every row, is the same whichever pools run beside it. Each row samples from its own stream
(:mod:`lgen.decode.sampling`) at its own step, so a record does not depend on its neighbours.

:meth:`ContinuousEngine.generate` is called once per group (``predict_step``): it admits the group,
decodes until there is room for the next one (the draining pools step along), and returns the rows
that finished meanwhile, whichever pool they came from. The rank's last group drains every pool.

A stop (:class:`lgen.decode.deadline.Deadline`) admits no more groups: every pool drains until the
deadline, and the rows still running then are dropped, however large the pools or
``max_new_tokens`` (they are generated again on resume, the same rows, since a row does not depend
on the pool it ran in).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lgen.batch import Batch
from lgen.decode.deadline import Deadline
from lgen.decode.engine import Results, next_step
from lgen.decode.settings import DecodeSettings
from lgen.decode.steppers import PoolStepper
from lgen.decode.stopping import StopRules, first_stops
from lgen.kernels import decoding


@dataclass(kw_only=True)
class _Pool:
    """One stream's pool: the stepper and, per row, what the decode loop tracks."""

    stream: int
    capacity: int  # the most rows that decode together
    stepper: PoolStepper
    rules: StopRules
    logits: torch.Tensor  # [rows, vocab]: the next token's scores
    tokens: torch.Tensor  # [rows, width]: each row's generated ids
    steps: torch.Tensor  # [rows]: tokens each row has generated
    keys: torch.Tensor  # [rows]: sampling streams
    live: torch.Tensor  # [rows]: holds a row whose record is not out yet
    done: torch.Tensor  # [rows]: a rule ended the row
    stop_rule: torch.Tensor  # [rows]
    stop_step: torch.Tensor  # [rows]
    owner: list[tuple[dict[str, Any], int] | None]  # (example, sample) of each row; None: free
    cuda: torch.cuda.Stream | None  # the CUDA stream all of the pool's work runs on (None: the current one)

    def in_flight(self) -> int:
        """Rows whose record is not out yet (counted on the host: no sync)."""
        return sum(owner is not None for owner in self.owner)

    def select(self, sel: torch.Tensor, padding: int = 0) -> None:
        """After the stepper took rows ``sel``: the same rows of everything else, the last
        ``padding`` of them free (they repeat a row)."""
        for name in ("logits", "tokens", "steps", "keys", "live", "done", "stop_rule", "stop_step"):
            setattr(self, name, getattr(self, name)[sel])
        if padding:
            self.live[-padding:] = False
        rows = sel.tolist()
        self.owner = [self.owner[r] for r in rows[: len(rows) - padding]] + [None] * padding
        self.rules.select(sel)


class _Emitter:
    """Hands the rows a long call finished to ``emit`` at most once every ``seconds`` (each hand-off
    is a write and an fsync), emptying the list given."""

    seconds = 1.0

    def __init__(self, emit: Callable[[list], None] | None) -> None:
        self.emit, self.last = emit, time.monotonic()

    def __call__(self, results: list) -> None:
        if self.emit is None or not results or time.monotonic() - self.last < self.seconds:
            return
        self.emit(results[:])
        results.clear()
        self.last = time.monotonic()


class ContinuousEngine:
    """The compact decode loop over a pool that new prompts join (see the module docstring).

    Args:
        config: the generation config (greedy, or temperature / top-k / top-p sampling).
        settings: the run's decode settings (``compact_every``: steps between looks at which rows
            ended, each one host sync; ``cuda_graphs``: replay the pool's step from a CUDA graph;
            ``invariant``: each row computed as if alone; ``samples``).
        rules: makes a pool's stopping rules.
        tokenizer: decodes finished rows.
        pad_token_id: what fills a row after it ended.
    """

    def __init__(self, config: GenerationConfig, settings: DecodeSettings, *, rules: Callable[[], StopRules],
                 tokenizer: PreTrainedTokenizerBase, pad_token_id: int) -> None:
        self.config, self.settings, self.rules, self.tokenizer = config, settings, rules, tokenizer
        self.pad_token_id, self.compact_every, self.samples = pad_token_id, settings.compact_every, settings.samples
        self.filling: _Pool | None = None  # the pool of the stream whose groups are coming
        self.draining: list[_Pool] = []  # pools of streams whose groups are all in

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, batch: Batch, *, row_keys: torch.Tensor | None,
                 deadline: Deadline | None = None, emit: Callable[[list], None] | None = None) -> Results:
        group = batch.group
        if group is None:
            raise ValueError("continuous batching needs a batch of a stream plan (data.connect(continuous=True))")
        if self.config.do_sample and row_keys is None:
            raise ValueError("sampling needs row_keys")
        with decoding(model, invariant=self.settings.invariant, spans=self.settings.span_attention):
            return self._generate(model, batch, row_keys, deadline or Deadline(), _Emitter(emit))

    def _generate(self, model: torch.nn.Module, batch: Batch, row_keys: torch.Tensor | None,
                  deadline: Deadline, emitter: _Emitter) -> Results:
        group = batch.group
        results: list[tuple[dict[str, Any], int, Any]] = []
        computed = 0
        if deadline.requested:
            return self._wind_down(results, computed, deadline, emitter)
        pool = self.filling
        if pool is None or pool.stream != group.stream:
            if pool is not None:
                raise RuntimeError(f"stream {pool.stream} ended before its last group")
            while self.draining and self._in_use() + group.pool_rows * (group.pool_length + self.compact_every) \
                    > group.budget:  # the new pool must fit beside the draining ones: they go on alone
                computed += self._window(self.draining, results)
                emitter(results)
                if deadline.requested:
                    return self._wind_down(results, computed, deadline, emitter)
            pool = self.filling = self._new_pool(model, batch)
        self._admit(pool, batch, row_keys)
        decoded = False
        if group.last:  # the stream's groups are all in: its pool drains beside the next streams' pools
            self.filling = None
            self.draining.append(pool)
        if group.final:
            while self.draining and not deadline.requested:  # the rank's last call: it may run long
                computed += self._window(self.draining, results)
                emitter(results)
        elif not group.last:
            while pool.capacity - pool.in_flight() < group.group_rows and not deadline.requested:
                computed += self._window([pool, *self.draining], results)  # until the next group fits
                decoded = True
        if deadline.requested:
            return self._wind_down(results, computed, deadline, emitter)
        if not decoded and self.draining:  # draining pools go on while the next group is prefilled: a
            computed += self._window(self.draining, results)  # pool's own timeline is all that sets its rows
        return Results(results, computed)

    def _wind_down(self, results: list[tuple[dict[str, Any], int, Any]], computed: int,
                   deadline: Deadline, emitter: _Emitter) -> Results:
        """A stop: every pool drains until the deadline; the rows still running then are dropped."""
        if self.filling is not None:
            self.draining.append(self.filling)
            self.filling = None
        while self.draining and not deadline.expired():
            computed += self._window(self.draining, results, deadline)
            emitter(results)
        dropped = sum(pool.in_flight() for pool in self.draining)
        self.draining = []
        return Results(results, computed, dropped)

    def in_flight(self) -> int:
        """Rows admitted whose records are not out yet, in every pool."""
        return sum(pool.in_flight() for pool in [*([self.filling] if self.filling else []), *self.draining])

    def _in_use(self) -> int:
        """Cache positions the draining pools hold."""
        return sum(pool.stepper.rows * pool.stepper.length for pool in self.draining)

    def _window(self, pools: list[_Pool], results: list[tuple[dict[str, Any], int, Any]],
                deadline: Deadline | None = None) -> int:
        """``compact_every`` steps of each pool, a step of each in turn, then a look at each; adds the
        rows that ended to ``results``, drops the draining pools left empty, and returns the
        row-steps computed. Each pool runs on a CUDA stream of its own: while the host waits on one
        pool's step (sampling reads its logits, a look reads which rows ended), the GPU runs the
        other pools' steps, and the host's work between steps no longer leaves it idle. A
        ``deadline`` that passes between steps ends the window there, without a look: what is in
        flight is then dropped."""
        computed = sum(pool.tokens.shape[0] for pool in pools) * self.compact_every
        for _ in range(self.compact_every):
            if deadline is not None and deadline.expired():
                return computed
            for pool in pools:
                with torch.cuda.stream(pool.cuda):
                    self._step(pool)
        for pool in pools:
            with torch.cuda.stream(pool.cuda):
                results += self._collect(pool)
                if deadline is None or not pool.stepper.graph:  # winding down: no new graph captures
                    self._fit(pool, draining=pool is not self.filling)
        self.draining = [pool for pool in self.draining if pool.in_flight()]
        return computed

    def _new_pool(self, model: torch.nn.Module, batch: Batch) -> _Pool:
        device = batch.input_ids.device
        cuda = torch.cuda.Stream(device) if device.type == "cuda" else None
        if cuda is not None:
            cuda.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(cuda):
            return self._pool_on(model, batch, cuda)

    def _pool_on(self, model: torch.nn.Module, batch: Batch, cuda: torch.cuda.Stream | None) -> _Pool:
        group = batch.group
        device = batch.input_ids.device
        graph = self.settings.cuda_graphs and device.type == "cuda"
        rows = group.pool_rows
        width = group.max_new_tokens + self.compact_every  # a row runs on until the next look
        stepper = PoolStepper(model, rows=rows, length=group.pool_length + self.compact_every, graph=graph,
                              aligned=self.settings.invariant)
        rules = self.rules()
        rules.start(rows, device, group.max_new_tokens)
        vocab = model.config.get_text_config(decoder=True).vocab_size

        def full(value: int, dtype=torch.long) -> torch.Tensor:
            return torch.full((rows,), value, dtype=dtype, device=device)

        return _Pool(stream=group.stream, capacity=rows, stepper=stepper, rules=rules,
                     logits=torch.zeros((rows, vocab), dtype=torch.float32, device=device),
                     tokens=torch.full((rows, width), self.pad_token_id, dtype=torch.long, device=device),
                     steps=full(0), keys=full(0), live=full(False, torch.bool), done=full(False, torch.bool),
                     stop_rule=full(-1), stop_step=full(-1), owner=[None] * rows, cuda=cuda)

    def _admit(self, pool: _Pool, batch: Batch, row_keys: torch.Tensor | None) -> None:
        """Prefill the group and give its rows free places, on the pool's CUDA stream: after the work
        that made the batch's tensors, which are kept until the pool's stream is done with them."""
        if pool.cuda is not None:
            pool.cuda.wait_stream(torch.cuda.current_stream(pool.cuda.device))
            for t in (batch.input_ids, batch.attention_mask, row_keys):
                if t is not None:
                    t.record_stream(pool.cuda)
        with torch.cuda.stream(pool.cuda):
            self._admit_on(pool, batch, row_keys)

    def _admit_on(self, pool: _Pool, batch: Batch, row_keys: torch.Tensor | None) -> None:
        count = len(batch.examples) * self.samples
        free = [r for r, owner in enumerate(pool.owner) if owner is None]
        if count > len(free) and not pool.stepper.graph:  # an eager pool holds its live rows only: add rows
            rows = len(pool.owner)
            extra = count - len(free)
            sel = torch.cat([torch.arange(rows), torch.zeros(extra, dtype=torch.long)]).to(pool.live.device)
            pool.stepper.select(sel)
            pool.select(sel, extra)
            free += list(range(rows, rows + extra))
        if count > len(free):
            raise RuntimeError(f"a group of {count} rows does not fit the {len(free)} free rows of the pool")
        slots = torch.tensor(free[:count], dtype=torch.long, device=pool.live.device)
        pool.logits[slots] = pool.stepper.admit(slots, batch.input_ids, batch.attention_mask, self.samples)
        for i, slot in enumerate(free[:count]):
            pool.owner[slot] = (batch.examples[i // self.samples], i % self.samples + 1)
        pool.tokens[slots] = self.pad_token_id
        pool.steps[slots] = 0
        pool.keys[slots] = row_keys if row_keys is not None else 0
        pool.live[slots] = True
        pool.done[slots] = False
        pool.stop_rule[slots] = -1
        pool.stop_step[slots] = -1
        pool.rules.admit(slots, batch.max_new_tokens)

    def _step(self, pool: _Pool) -> None:
        """One decode step of the whole pool: sample each running row's token, advance the rules,
        run the model."""
        last = pool.tokens.shape[1] - 1
        running = pool.live & ~pool.done
        token, ended, which = next_step(pool.logits, self.config, pool.keys, pool.steps, running=running,
                                        rules=pool.rules, pad_token_id=self.pad_token_id)
        pool.tokens[torch.arange(pool.tokens.shape[0], device=token.device), pool.steps.clamp(max=last)] = token
        pool.stop_rule, pool.stop_step = first_stops(pool.stop_rule, pool.stop_step, ended, which, pool.steps,
                                                     running=running)
        pool.done = pool.done | ended
        pool.steps = pool.steps + 1
        pool.logits = pool.stepper.step(token)

    def _collect(self, pool: _Pool) -> list[tuple[dict[str, Any], int, Any]]:
        """The rows that ended, decoded and cut; their places are free after. Stop strings are
        looked for here, in the live rows' text. Reading which rows ended is the one host sync of
        ``compact_every`` steps."""
        live, done = torch.stack([pool.live, pool.done]).cpu()
        running = (live & ~done).nonzero().squeeze(1)
        if running.numel() and pool.rules.scanning:
            at = running.to(pool.tokens.device)
            hits = pool.rules.scan(pool.tokens[at], self.compact_every, pool.steps[at])
            if any(hits):
                hit = running[torch.tensor(hits)]
                done[hit] = True
                pool.done[hit.to(pool.done.device)] = True
        ended = (live & done).nonzero().squeeze(1)
        if not ended.numel():
            return []
        at = ended.to(pool.tokens.device)
        finished = pool.rules.finish(pool.tokens[at], pool.stop_rule[at], pool.stop_step[at], self.tokenizer)
        out = []
        for slot, result in zip(ended.tolist(), finished):
            example, sample = pool.owner[slot]
            out.append((example, sample, result))
            pool.owner[slot] = None
        pool.live[at] = False
        return out

    def _fit(self, pool: _Pool, *, draining: bool) -> None:
        """Move the live rows to a smaller pool: eagerly at once (a free row costs as much as a
        live one), with a CUDA graph only once no prompt will join (a new size is a new capture)."""
        if pool.stepper.graph and not draining:
            return
        if not pool.in_flight():
            return
        live = torch.tensor([r for r, owner in enumerate(pool.owner) if owner is not None], device=pool.live.device)
        sel = pool.stepper.compact(live)
        if sel is not None:
            pool.select(sel, sel.numel() - live.numel())
