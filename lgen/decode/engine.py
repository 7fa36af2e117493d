"""The engine contract: what turns a batch of left-padded prompts into finished rows under the
stopping rules (:class:`Engine`), and what an engine returns (:class:`Results`, :class:`Generated`).

Three engines implement it, each in a module of its own:

* :class:`lgen.decode.continuous.ContinuousEngine`: lgen's decode loop over a pool that new prompts
  join as finished rows leave (continuous batching); the default.
* :class:`lgen.decode.compact.CompactEngine`: the same loop over one batch at a time, for ranks
  that decode in lockstep (ZeRO-3).
* :class:`lgen.decode.generate.GenerateEngine`: ``model.generate``, for the settings lgen's loop
  lacks (beam search, repetition penalty, ...) and prompt-learning adapters.

:class:`lgen.decode.settings.DecodeSettings` says which one runs, and how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lgen.batch import Batch
from lgen.decode import sampling
from lgen.decode.deadline import Deadline
from lgen.decode.stopping import Finished, StopRules


@dataclass
class Generated:
    """``tokens``: ``[rows, steps]`` generated ids, padding after each row ended; ``stop_rule`` and
    ``stop_step``: the rule (its index in the :class:`StopRules`) that ended each row first, and the
    step (-1: none); ``slots``: row-steps computed, for the useful-slot fraction; ``dropped``: the
    rows a stop's deadline cut before they ended (None: none), which must not become records."""

    tokens: torch.Tensor
    stop_rule: torch.Tensor
    stop_step: torch.Tensor
    _: KW_ONLY
    slots: int
    dropped: torch.Tensor | None = None


@dataclass
class Results:
    """What a ``generate`` call finished: (example, sample number from 1, the row cut where it
    ended) for each row, the row-steps computed, and the rows dropped unfinished at a stop."""

    rows: list[tuple[dict[str, Any], int, Finished]]
    slots: int
    dropped: int = 0


class Engine(Protocol):
    """What ``predict_step`` asks of an engine (:func:`lgen.decode.make_engine` builds one)."""

    def generate(self, model: torch.nn.Module, batch: Batch, *, row_keys: torch.Tensor | None,
                 deadline: Deadline | None = None, emit: Callable[[list], None] | None = None) -> Results:
        """Take one batch of prompts; return the rows that finished (for the batch engines, all of
        the batch's; for continuous batching, whichever ended meanwhile). ``row_keys``: one int64
        per output row (prompt i's samples at ``i * n .. i * n + n - 1``), seeding sampling. Once
        ``deadline`` is requested, admit no prompt; once it expired, drop the rows in flight. A
        call that runs long may hand rows it finished to ``emit`` before it returns the rest."""

    def in_flight(self) -> int:
        """Rows admitted by earlier calls whose records are not out yet."""


class Batchwise:
    """``generate`` for engines that finish a whole batch in one ``run``."""

    config: GenerationConfig
    rules: Callable[[], StopRules]
    tokenizer: PreTrainedTokenizerBase
    synced: bool

    def in_flight(self) -> int:
        return 0  # a batch is finished within its call

    def generate(self, model: torch.nn.Module, batch: Batch, *, row_keys: torch.Tensor | None,
                 deadline: Deadline | None = None, emit: Callable[[list], None] | None = None) -> Results:
        if deadline is not None and deadline.requested and not self.synced:  # stopping: admit nothing (ranks
            return Results([], 0)  # in lockstep run the batch, to the deadline they agree on, to join its forwards)
        rules = self.rules()
        out = self.run(model, batch.input_ids, batch.attention_mask, max_new_tokens=batch.max_new_tokens,
                       rules=rules, row_keys=row_keys, deadline=deadline)
        finished = rules.finish(out.tokens, out.stop_rule, out.stop_step, self.tokenizer)
        samples = int(self.config.num_return_sequences or 1)
        dropped = [False] * len(finished) if out.dropped is None else out.dropped.tolist()
        return Results([(batch.examples[r // samples], r % samples + 1, f)
                        for r, f in enumerate(finished) if not dropped[r]], out.slots, sum(dropped))


def next_step(logits: torch.Tensor, config: GenerationConfig, keys: torch.Tensor | None, steps: int | torch.Tensor, *,
              running: torch.Tensor, rules: StopRules, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """One decode step's tokens (``[rows]``: greedy or each row's own sample at its step; padding
    where a row is not ``running``), and which rows a rule ended at it and by which rule (see
    :meth:`lgen.decode.stopping.StopRules.advance`)."""
    token = torch.where(running, sampling.next_tokens(logits, config, keys, steps), pad_token_id)
    ended, which = rules.advance(token)
    return token, ended, which
