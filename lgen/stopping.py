"""Stopping rules: a code-aware brace matcher that runs on the device, and the host-side cut.

The brace matcher is a character-level lexer (strings, char literals, comments) lifted to a
token-level finite-state machine once per tokenizer. For every lexer state ``q`` and token ``t``
it stores the next state, the net brace change and the lowest level reached inside ``t``.
A decode step is then a few gathers over ``(batch,)`` tensors: no ``.item()``, no decode, no
Python loop over rows.

Worked example (``language="c"``, start level 1)::

    token   text        level before  lowest inside  level after  stop?
    t1      "return"    1             1              1            no
    t2      ' "}";'     1             1              1            no  (brace inside a string)
    t3      "\\n}}"      1             0              -1           yes (crosses zero at the first "}")
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

Language = Literal["c", "python", "plain"]

# Character classes. Every character outside the table is OTHER.
OPEN, CLOSE, DQUOTE, SQUOTE, SLASH, STAR, BACKSLASH, NEWLINE, HASH, OTHER = range(10)
_CLASS_OF = {"{": OPEN, "}": CLOSE, '"': DQUOTE, "'": SQUOTE, "/": SLASH, "*": STAR, "\\": BACKSLASH, "\n": NEWLINE, "#": HASH}
N_CLASSES = 10


@dataclass(frozen=True)
class Lexer:
    """A character-level lexer as tables over (state, character class).

    ``next_state[q, c]`` is the state after reading a character of class ``c`` in state ``q``;
    a character may apply two brace changes in order: ``pending[q, c]`` (a brace held back while
    deciding whether ``'x`` was a char literal) then ``delta[q, c]`` (the character itself).
    State 0 is ordinary code.
    """

    names: tuple[str, ...]
    next_state: np.ndarray
    pending: np.ndarray
    delta: np.ndarray

    @property
    def n_states(self) -> int:
        return len(self.names)


def _build_lexer(language: Language) -> Lexer:
    if language == "c":
        names = ("code", "slash", "line_comment", "block_comment", "block_star", "string", "string_escape",
                 "char_open", "char_escape", "char_escape_body", "char_pending_open", "char_pending_close",
                 "char_pending_other")
    elif language == "python":
        names = ("code", "comment", "dstring", "dstring_escape", "sstring", "sstring_escape")
    elif language == "plain":
        names = ("code",)
    else:
        raise ValueError(f"language={language!r} is not one of 'c', 'python', 'plain'")
    s = {name: i for i, name in enumerate(names)}
    n = len(names)
    nxt = np.zeros((n, N_CLASSES), dtype=np.int64)
    pend = np.zeros((n, N_CLASSES), dtype=np.int64)
    dlt = np.zeros((n, N_CLASSES), dtype=np.int64)
    for q in range(n):
        nxt[q, :] = q
    code_row = np.zeros(N_CLASSES, dtype=np.int64)  # next state from code, filled per language
    code_delta = np.zeros(N_CLASSES, dtype=np.int64)
    code_delta[OPEN], code_delta[CLOSE] = 1, -1

    if language == "plain":
        dlt[0] = code_delta
        return Lexer(names, nxt, pend, dlt)

    if language == "python":
        code_row[DQUOTE], code_row[SQUOTE], code_row[HASH] = s["dstring"], s["sstring"], s["comment"]
        nxt[0], dlt[0] = code_row, code_delta
        nxt[s["comment"], NEWLINE] = 0
        for quote, body, esc in ((DQUOTE, "dstring", "dstring_escape"), (SQUOTE, "sstring", "sstring_escape")):
            nxt[s[body], quote] = 0
            nxt[s[body], BACKSLASH] = s[esc]
            nxt[s[body], NEWLINE] = 0  # an unterminated single-line string ends at the line
            nxt[s[esc], :] = s[body]
        return Lexer(names, nxt, pend, dlt)

    # C family: C, C++, C#, Java, JavaScript/TypeScript, Go, Kotlin, Swift, PHP, Rust.
    code_row[:] = 0
    code_row[DQUOTE], code_row[SQUOTE], code_row[SLASH] = s["string"], s["char_open"], s["slash"]
    nxt[0], dlt[0] = code_row, code_delta
    # "/" then: "/" starts a line comment, "*" a block comment, anything else is code again.
    nxt[s["slash"]], dlt[s["slash"]] = code_row, code_delta
    nxt[s["slash"], SLASH], nxt[s["slash"], STAR] = s["line_comment"], s["block_comment"]
    dlt[s["slash"], SLASH] = dlt[s["slash"], STAR] = 0
    nxt[s["line_comment"], NEWLINE] = 0
    nxt[s["block_comment"], STAR] = s["block_star"]
    nxt[s["block_star"], :] = s["block_comment"]
    nxt[s["block_star"], STAR], nxt[s["block_star"], SLASH] = s["block_star"], 0
    nxt[s["string"], DQUOTE], nxt[s["string"], BACKSLASH] = 0, s["string_escape"]
    nxt[s["string_escape"], :] = s["string"]
    # "'" opens a char literal ('{', '\n', '\u{7b}') or a Rust lifetime/label ('a, 'outer:).
    # One character after the quote is held back; a closing quote makes it a literal, anything
    # else makes it code (its brace, if any, counts then).
    q = s["char_open"]
    nxt[q, :] = s["char_pending_other"]
    nxt[q, OPEN], nxt[q, CLOSE] = s["char_pending_open"], s["char_pending_close"]
    nxt[q, BACKSLASH], nxt[q, SQUOTE], nxt[q, NEWLINE] = s["char_escape"], 0, 0
    nxt[s["char_escape"], :] = s["char_escape_body"]
    nxt[s["char_escape"], NEWLINE] = 0
    nxt[s["char_escape_body"], SQUOTE] = nxt[s["char_escape_body"], NEWLINE] = 0
    for name, held in (("char_pending_open", 1), ("char_pending_close", -1), ("char_pending_other", 0)):
        q = s[name]
        nxt[q], dlt[q], pend[q] = code_row, code_delta, held
        nxt[q, SQUOTE], dlt[q, SQUOTE], pend[q, SQUOTE] = 0, 0, 0
    return Lexer(names, nxt, pend, dlt)


def char_classes(text: str) -> list[int]:
    return [_CLASS_OF.get(ch, OTHER) for ch in text]


def find_close(text: str, start_level: int = 1, language: Language = "c", state: int = 0) -> int | None:
    """Index of the character at which the brace level first drops to zero, or None.

    This is the host-side twin of :class:`BraceMatchingCriteria`, used once per finished row to
    cut the decoded prediction at the exact character.
    """
    lex = lexer(language)
    level, opened = start_level, start_level > 0
    for i, c in enumerate(char_classes(text)):
        # a pending change belongs to the previous character ('}x: the "}" is at i - 1)
        for at, change in ((i - 1, lex.pending[state, c]), (i, lex.delta[state, c])):
            level += int(change)
            opened = opened or level > 0
            if change < 0 and opened and level <= 0:
                return at
        state = int(lex.next_state[state, c])
    return None


_LEXERS: dict[str, Lexer] = {}


def lexer(language: Language) -> Lexer:
    if language not in _LEXERS:
        _LEXERS[language] = _build_lexer(language)
    return _LEXERS[language]


@dataclass
class TokenTable:
    """The lexer lifted to tokens: ``[n_states, vocab]`` tables (see the module docstring)."""

    next_state: torch.Tensor
    delta: torch.Tensor
    lowest: torch.Tensor
    highest: torch.Tensor

    def to(self, device: torch.device) -> TokenTable:
        if self.next_state.device == device:
            return self
        return TokenTable(*(t.to(device) for t in (self.next_state, self.delta, self.lowest, self.highest)))


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text each token id adds when decoded; special tokens add nothing."""
    size = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    for i in tokenizer.all_special_ids:
        if 0 <= i < size:
            texts[i] = ""
    return texts


def build_token_table(texts: list[str], language: Language = "c") -> TokenTable:
    """Run the lexer over every token from every state at once (vectorised over the vocabulary)."""
    lex = lexer(language)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    # Tokens sorted longest first: at column j only the first ``alive[j]`` of them have a character,
    # so the work is the total length of the vocabulary, not vocab x longest token.
    order = np.argsort(-lengths, kind="stable")
    width = int(lengths.max(initial=0))
    classes = np.full((len(texts), max(width, 1)), OTHER, dtype=np.int64)
    for row, i in enumerate(order):
        if lengths[i]:
            classes[row, : lengths[i]] = char_classes(texts[i])
    alive = [int((lengths > j).sum()) for j in range(width)]
    n_states, vocab = lex.n_states, len(texts)
    out_state = np.empty((n_states, vocab), np.int64)
    out_delta = np.empty((n_states, vocab), np.int64)
    out_low = np.empty((n_states, vocab), np.int64)
    out_high = np.empty((n_states, vocab), np.int64)
    for q0 in range(n_states):
        state = np.full(vocab, q0, np.int64)
        level = np.zeros(vocab, np.int64)
        low = np.zeros(vocab, np.int64)
        high = np.zeros(vocab, np.int64)
        for j in range(width):
            a = alive[j]
            c, st = classes[:a, j], state[:a]
            lv = level[:a] + lex.pending[st, c]
            np.minimum(low[:a], lv, out=low[:a])
            np.maximum(high[:a], lv, out=high[:a])
            lv += lex.delta[st, c]
            np.minimum(low[:a], lv, out=low[:a])
            np.maximum(high[:a], lv, out=high[:a])
            level[:a] = lv
            state[:a] = lex.next_state[st, c]
        out_state[q0, order], out_delta[q0, order], out_low[q0, order], out_high[q0, order] = state, level, low, high
    return TokenTable(*(torch.from_numpy(a) for a in (out_state, out_delta, out_low, out_high)))


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tokenizer: PreTrainedTokenizerBase, language: Language = "c") -> TokenTable:
    """The token table for a tokenizer, built once and cached for the tokenizer's lifetime."""
    per_tokenizer = _TABLES.setdefault(tokenizer, {})
    if language not in per_tokenizer:
        per_tokenizer[language] = build_token_table(token_texts(tokenizer), language)
    return per_tokenizer[language]


class BraceMatchingCriteria(StoppingCriteria):
    """Stops each sequence when the brace level, counted outside strings and comments, hits zero.

    Called by ``generate`` once per step with the whole sequence so far (prompt included, left
    padding allowed). State is per row and lives on the device; a call whose sequence is not one
    token longer than the last call's starts afresh, so one instance serves many ``generate`` calls.

    Args:
        tokenizer: the tokenizer whose ids ``generate`` produces.
        start_level: brace level at the start of generation (1 when the prompt ends in ``{``).
        language: lexer family: ``"c"`` (C, C++, Java, JS, Go, Rust, ...), ``"python"`` (``#``
            comments, both quote kinds are strings) or ``"plain"`` (count every brace, as the seed).
        table: a prebuilt :class:`TokenTable` (then ``tokenizer`` may be None).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, start_level: int = 1, language: Language = "c",
                 table: TokenTable | None = None) -> None:
        if start_level < 0:
            raise ValueError(f"brace_matching_start_level must be >= 0, got {start_level}")
        self.table = table if table is not None else token_table(tokenizer, language)
        self.start_level = start_level
        self.language = language
        self._length = -1

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.table = self.table.to(device)
        self.state = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.level = torch.full((batch_size,), self.start_level, dtype=torch.long, device=device)
        self.opened = self.level > 0
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.stop_step = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.step = 0

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Read one token per row; return the rows that stop on it (``(batch,)`` bool, on the device)."""
        t = self.table
        low = t.lowest[self.state, token]
        high = t.highest[self.state, token]
        delta = t.delta[self.state, token]
        # stop inside this token: the level was positive (or rose above zero in it) and fell to <= 0
        crossed = self.opened & (self.level + low <= 0)
        rose_and_fell = ~self.opened & (self.level + high > 0) & (self.level + delta <= 0)
        stop = ~self.done & (crossed | rose_and_fell)
        self.done |= stop
        self.opened |= self.level + high > 0
        self.level = self.level + delta
        self.state = t.next_state[self.state, token]
        return stop

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (when a decode loop drops finished rows)."""
        for name in ("state", "level", "opened", "done", "stop_step"):
            setattr(self, name, getattr(self, name)[keep])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1]
        if length != self._length + 1 or input_ids.shape[0] != self.state.shape[0]:
            self.reset(input_ids.shape[0], input_ids.device)
        self._length = length
        stop = self.advance(input_ids[:, -1])
        self.stop_step = torch.where(stop, self.step, self.stop_step)
        self.step += 1
        return self.done.clone()


FinishReason = Literal["brace_matching", "stop_string", "stop", "length"]


@dataclass(frozen=True)
class Finished:
    """One generated sequence, cut where it ended."""

    text: str
    reason: FinishReason
    tokens: int


def finish(
    generated: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    eos_token_ids: list[int],
    brace: BraceMatchingCriteria | None = None,
    stop_strings: list[str] | None = None,
    keep_stop_string: bool = False,
    brace_stop: torch.Tensor | None = None,
) -> list[Finished]:
    """Decode ``generated`` (``[rows, steps]``, prompt removed) and cut each row where it stopped.

    Precedence when several rules end a row: the one whose end comes first in the text wins; on a
    tie brace matching beats a stop string. EOS (``stop``) counts only where neither fired before
    it, and ``length`` is what is left. Tokens after a row stopped are padding and are ignored.
    ``brace_stop`` gives each row's brace stop step when not ``brace.stop_step``.
    """
    rows = generated.tolist()
    if brace_stop is None:
        brace_stop = brace.stop_step if brace is not None else torch.full((len(rows),), -1)
    stop_steps = brace_stop.tolist()
    eos = set(eos_token_ids)
    out = []
    for row, b in zip(rows, stop_steps):
        eos_pos = next((j for j, t in enumerate(row) if t in eos), None)
        brace_step = b if b >= 0 and (eos_pos is None or b < eos_pos) else None
        limit = brace_step + 1 if brace_step is not None else (eos_pos if eos_pos is not None else len(row))
        text = tokenizer.decode(row[:limit], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ends: list[tuple[int, int, str, FinishReason]] = []  # (end char, rank, text, reason)
        if brace_step is not None:
            cut = find_close(text, brace.start_level, brace.language)
            end = len(text) if cut is None else cut + 1
            ends.append((end, 0, text[:end], "brace_matching"))
        for s in stop_strings or ():
            at = text.find(s)
            if at >= 0:
                ends.append((at + len(s), 1, text[: at + len(s)] if keep_stop_string else text[:at], "stop_string"))
        if ends:
            _, rank, cut_text, reason = min(ends)
            if reason == "brace_matching":
                tokens = brace_step + 1
            else:  # the fewest tokens whose text holds the stop string
                lo, hi = 1, limit
                while lo < hi:
                    mid = (lo + hi) // 2
                    decoded = tokenizer.decode(row[:mid], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                    lo, hi = (lo, mid) if any(x in decoded for x in stop_strings) else (mid + 1, hi)
                tokens = lo
            out.append(Finished(cut_text, reason, tokens))
        elif eos_pos is not None:
            out.append(Finished(text, "stop", eos_pos + 1))
        else:
            out.append(Finished(text, "length", len(row)))
    return out
