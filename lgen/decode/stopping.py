"""Stopping rules: why a row ends, where its text is cut, and which ``finish_reason`` it reports.

A rule can act at three moments:

* ``advance`` (the device, every decode step): which rows the token just generated ends, as a
  ``(rows,)`` bool tensor, with no host sync (end of sequence, brace matching, length);
* ``scan`` (the host, now and then: at each compaction of the compact engine): which rows' recent
  text ends them (stop strings, which need decoded text);
* ``cut`` (the host, once per finished row): where the rule ends the decoded text, if it does.

:class:`StopRules` holds the rules in precedence order and ORs them, as transformers'
``StoppingCriteriaList`` does; the engines record, per row, the first step at which a rule ended
it and which rule. :meth:`StopRules.finish` then decodes each row up to that step and asks every
rule for its cut: the cut that ends the text first wins, ties going to the earlier rule. With the
default order (brace matching, stop strings, end of sequence, length) a stop string ends a row
even when it comes right before an EOS, and EOS counts only where nothing cut the text before it.

Adding a rule is one subclass of :class:`StopRule` here, plus the option that turns it on in
:meth:`lgen.module.GenerationModule.stop_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

from lgen.decode.braces import Language, TokenTable, find_close

FinishReason = Literal["brace_matching", "stop_string", "stop", "length"]


@dataclass(frozen=True)
class Finished:
    """One generated sequence, cut where it ended; ``tokens`` counts the generated tokens it used."""

    text: str
    reason: FinishReason
    tokens: int


class StopRule:
    """One reason to end a row (see the module docstring). Override what the rule needs."""

    reason: ClassVar[FinishReason]
    #: whether the token that fired the rule belongs to the text (an EOS token does not)
    keeps_token: ClassVar[bool] = True

    def start(self, rows: int, device: torch.device, max_new_tokens: int) -> None:
        """A new batch of ``rows`` output rows that may run ``max_new_tokens`` steps."""

    def admit(self, slots: torch.Tensor, max_new_tokens: int) -> None:
        """New rows take the places ``slots`` (continuous batching): their state starts afresh."""

    def advance(self, token: torch.Tensor) -> torch.Tensor | None:
        """``(rows,)`` bool: the rows this step's ``token`` ends; None for a rule that never does."""
        return None

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (the decode loop dropped the others)."""

    def scan(self, generated: torch.Tensor, new: int, lengths: torch.Tensor | None = None) -> list[bool] | None:
        """Which rows' text so far ends them; ``generated`` holds their ids (``[rows, steps]``; with
        ``lengths``, row i's first ``lengths[i]``), of which the last ``new`` arrived since the
        previous scan. None for a rule that never does."""
        return None

    def cut(self, text: str, fired: bool) -> tuple[int, str] | None:
        """Where this rule ends the row's decoded ``text``: (end character, the prediction), or None.
        ``fired`` tells whether this rule's ``advance`` ended the row."""
        return (len(text), text) if fired else None

    def tokens(self, row: list[int], step: int, limit: int) -> int:
        """The generated tokens a row used when this rule's cut won: ``step`` is where a rule ended
        the row (this one, unless it scans), ``limit`` how many tokens were decoded."""
        return step + 1


class EndOfSequence(StopRule):
    """An end-of-sequence token ends the row (``finish_reason: stop``); the token is not text."""

    reason = "stop"
    keeps_token = False

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def start(self, rows: int, device: torch.device, max_new_tokens: int) -> None:
        self.eos = torch.tensor(self.eos_token_ids or [-1], device=device)

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        return torch.isin(token, self.eos)


class Length(StopRule):
    """``max_new_tokens`` ends the row (``finish_reason: length``)."""

    reason = "length"

    def start(self, rows: int, device: torch.device, max_new_tokens: int) -> None:
        self.left = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)

    def admit(self, slots: torch.Tensor, max_new_tokens: int) -> None:
        self.left[slots] = max_new_tokens

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        self.left -= 1
        return self.left <= 0

    def select(self, keep: torch.Tensor) -> None:
        self.left = self.left[keep]


class BraceMatching(StopRule):
    """Ends a row when the brace level, counted outside strings and comments, reaches zero, and cuts
    the text right after the ``}`` that got it there, mid-token if need be.

    A token that crosses zero (``}}``, ``} else {``) ends the row. With ``start_level`` 0 the level
    must first rise above zero (the answer opens its own braces).
    """

    reason = "brace_matching"

    def __init__(self, table: TokenTable, *, start_level: int = 1, language: Language = "c") -> None:
        if start_level < 0:
            raise ValueError(f"brace_matching_start_level must be >= 0, got {start_level}")
        self.table, self.start_level, self.language = table, start_level, language

    def start(self, rows: int, device: torch.device, max_new_tokens: int) -> None:
        self.table = self.table.to(device)
        self.state = torch.zeros(rows, dtype=torch.long, device=device)
        self.level = torch.full((rows,), self.start_level, dtype=torch.long, device=device)
        self.opened = self.level > 0
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)

    def admit(self, slots: torch.Tensor, max_new_tokens: int) -> None:
        self.state[slots] = 0
        self.level[slots] = self.start_level
        self.opened[slots] = self.start_level > 0
        self.done[slots] = False

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        t = self.table
        low = t.lowest[self.state, token]
        high = t.highest[self.state, token]
        delta = t.delta[self.state, token]
        # ends inside this token: the level was positive (or rose above zero in it) and fell to <= 0
        crossed = self.opened & (self.level + low <= 0)
        rose_and_fell = ~self.opened & (self.level + high > 0) & (self.level + delta <= 0)
        stop = ~self.done & (crossed | rose_and_fell)
        self.done |= stop
        self.opened |= self.level + high > 0
        self.level = self.level + delta
        self.state = t.next_state[self.state, token]
        return stop

    def select(self, keep: torch.Tensor) -> None:
        for name in ("state", "level", "opened", "done"):
            setattr(self, name, getattr(self, name)[keep])

    def cut(self, text: str, fired: bool) -> tuple[int, str] | None:
        if not fired:
            return None
        close = find_close(text, self.start_level, self.language)
        end = len(text) if close is None else close + 1
        return end, text[:end]


class StopStrings(StopRule):
    """Ends a row at the first of ``strings`` in its text (``finish_reason: stop_string``), dropped
    from the prediction unless ``keep``.

    Found in decoded text on the host at each scan; only the tail can hold a new one: the tokens since
    the last scan plus room for the longest string (a character can take up to 4 byte-level tokens).
    A string missed there (e.g. split by special tokens) still cuts the prediction in ``cut``; only the
    early stop is lost.
    """

    reason = "stop_string"

    def __init__(self, strings: list[str], tokenizer: PreTrainedTokenizerBase, *, keep: bool = False) -> None:
        self.strings, self.tokenizer, self.keep = list(strings), tokenizer, keep

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def scan(self, generated: torch.Tensor, new: int, lengths: torch.Tensor | None = None) -> list[bool]:
        tail = new + 4 * max(len(s) for s in self.strings) + 4
        if lengths is None:
            tails = generated[:, -tail:].tolist()
        else:  # each row's own last ``tail`` tokens
            at = lengths[:, None] - tail + torch.arange(tail, device=generated.device)
            ids = generated.gather(1, at.clamp(min=0)).tolist()
            tails = [[t for t, ok in zip(row, valid) if ok] for row, valid in zip(ids, (at >= 0).tolist())]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [any(s in text for s in self.strings) for text in texts]

    def cut(self, text: str, fired: bool) -> tuple[int, str] | None:
        found = [(at + len(s), text[: at + len(s)] if self.keep else text[:at])
                 for s in self.strings if (at := text.find(s)) >= 0]
        return min(found) if found else None

    def tokens(self, row: list[int], step: int, limit: int) -> int:
        """The fewest tokens whose text holds a stop string."""
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi) // 2
            held = any(s in self._decode(row[:mid]) for s in self.strings)
            lo, hi = (lo, mid) if held else (mid + 1, hi)
        return lo


def first_stops(stop_rule: torch.Tensor, stop_step: torch.Tensor, ended: torch.Tensor, which: torch.Tensor,
                step: int | torch.Tensor, *, running: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stop_rule, stop_step)`` after a step: rows that ``ended`` now and were still running
    (default: no rule had ended them yet) take the rule ``which`` and the ``step``; the others keep
    what they had, so each row keeps the first rule that ended it."""
    first = ended & (stop_rule < 0 if running is None else running)
    return torch.where(first, which, stop_rule), torch.where(first, step, stop_step)


class StopRules:
    """The rules of one run, in precedence order; the engines OR them (see the module docstring)."""

    def __init__(self, rules: list[StopRule]) -> None:
        self.rules = list(rules)
        self.scanning = any(type(r).scan is not StopRule.scan for r in self.rules)

    def start(self, rows: int, device: torch.device, max_new_tokens: int) -> None:
        for rule in self.rules:
            rule.start(rows, device, max_new_tokens)

    def admit(self, slots: torch.Tensor, max_new_tokens: int) -> None:
        for rule in self.rules:
            rule.admit(slots, max_new_tokens)

    def advance(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ended, which)``: the rows this token ends and the first rule that ended each (-1: none)."""
        which = torch.full(token.shape, -1, dtype=torch.long, device=token.device)
        for i in reversed(range(len(self.rules))):
            stop = self.rules[i].advance(token)
            if stop is not None:
                which = torch.where(stop, i, which)
        return which >= 0, which

    def select(self, keep: torch.Tensor) -> None:
        for rule in self.rules:
            rule.select(keep)

    def replay(self, tokens: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stop_rule, stop_step)`` of rows already generated (``[rows, steps]``): the rule that
        ended each row first, and the step (-1: none), as a decode loop would have recorded them."""
        rows = tokens.shape[0]
        stop_rule = torch.full((rows,), -1, dtype=torch.long, device=tokens.device)
        stop_step = torch.full((rows,), -1, dtype=torch.long, device=tokens.device)
        self.start(rows, tokens.device, max_new_tokens)
        for step in range(tokens.shape[1]):
            ended, which = self.advance(tokens[:, step])
            stop_rule, stop_step = first_stops(stop_rule, stop_step, ended, which, step)
        return stop_rule, stop_step

    def scan(self, generated: torch.Tensor, new: int, lengths: torch.Tensor | None = None) -> list[bool] | None:
        """Rows whose text a scanning rule ends (None when no rule scans)."""
        if not self.scanning:
            return None
        hits = [False] * generated.shape[0]
        for rule in self.rules:
            found = rule.scan(generated, new, lengths)
            if found is not None:
                hits = [a or b for a, b in zip(hits, found)]
        return hits

    def finish(self, tokens: torch.Tensor, stop_rule: torch.Tensor, stop_step: torch.Tensor,
               tokenizer: PreTrainedTokenizerBase) -> list[Finished]:
        """Decode each row (``tokens``: ``[rows, steps]``, prompt removed) up to where a rule ended
        it (``stop_rule``/``stop_step``: which rule, at which step; -1: none) and cut it there."""

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        out = []
        for row, r, step in zip(tokens.tolist(), stop_rule.tolist(), stop_step.tolist()):
            fired = self.rules[r] if r >= 0 else None
            limit = len(row) if fired is None else step + int(fired.keeps_token)
            text = decode(row[:limit])
            best = None  # (end, rank, prediction)
            for rank, rule in enumerate(self.rules):
                cut = rule.cut(text, rule is fired)
                if cut is not None and (best is None or (cut[0], rank) < best[:2]):
                    best = (cut[0], rank, cut[1])
            if best is None:  # ended by a scan whose string the whole text does not show
                out.append(Finished(text, "length", len(row)))
                continue
            rule = self.rules[best[1]]
            out.append(Finished(best[2], rule.reason, rule.tokens(row, step, limit)))
        return out


class GenerateCriteria(StoppingCriteria):
    """:class:`StopRules` as ``model.generate``'s stopping criteria: called once per generated token
    with the whole sequence so far (prompt included), it ends the rows the rules end. Where each row
    ended is found afterwards, by :meth:`StopRules.replay` over the output rows."""

    def __init__(self, rules: StopRules, *, prompt_width: int, max_new_tokens: int) -> None:
        self.rules, self.prompt_width, self.max_new_tokens = rules, prompt_width, max_new_tokens
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.rules.start(input_ids.shape[0], input_ids.device, self.max_new_tokens)
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        ended, _ = self.rules.advance(input_ids[:, -1])
        self.done = self.done | ended
        hits = self.rules.scan(input_ids[:, self.prompt_width:], 1)
        if hits is not None:
            self.done = self.done | torch.tensor(hits, dtype=torch.bool, device=input_ids.device)
        return self.done.clone()
