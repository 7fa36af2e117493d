"""Brace levels in code: a character lexer, lifted to a token-level state machine once per tokenizer.

The lexer knows strings, char literals and comments, so braces inside them do not count. For every
lexer state ``q`` and token ``t`` the :class:`TokenTable` stores the next state, the net brace change
and the lowest and highest level reached inside ``t``, so a decode step is a few gathers over
``(rows,)`` tensors: no ``.item()``, no decode, no Python loop over rows.

Worked example (``language="c"``, start level 1)::

    token   text        level before  lowest inside  level after  stop?
    t1      "return"    1             1              1            no
    t2      ' "}";'     1             1              1            no  (brace inside a string)
    t3      "\\n}}"      1             0              -1           yes (crosses zero at the first "}")
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

Language = Literal["c", "python", "plain"]

# Character classes. Every character outside the table is OTHER.
OPEN, CLOSE, DQUOTE, SQUOTE, SLASH, STAR, BACKSLASH, NEWLINE, HASH, OTHER = range(10)
_CLASS_OF = {"{": OPEN, "}": CLOSE, '"': DQUOTE, "'": SQUOTE, "/": SLASH, "*": STAR, "\\": BACKSLASH,
             "\n": NEWLINE, "#": HASH}
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

    @functools.cached_property
    def moves(self) -> list[list[tuple[int, int, int]]]:
        """``moves[q][c]`` = (pending, delta, next state) as Python ints: the tables for a loop over
        characters on the host, where indexing numpy per character costs most of the time."""
        return [[(int(self.pending[q, c]), int(self.delta[q, c]), int(self.next_state[q, c]))
                 for c in range(N_CLASSES)] for q in range(self.n_states)]


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

    This is the host-side twin of the token table (:class:`lgen.decode.stopping.BraceMatching`),
    used once per finished row to cut the decoded prediction at the exact character.
    """
    moves = lexer(language).moves
    level, opened = start_level, start_level > 0
    for i, c in enumerate(char_classes(text)):
        pending, delta, following = moves[state][c]
        # a pending change belongs to the previous character ('}x: the "}" is at i - 1); a level above
        # zero has always opened, so a character that changes nothing is skipped
        if pending:
            level += pending
            opened = opened or level > 0
            if pending < 0 and opened and level <= 0:
                return i - 1
        if delta:
            level += delta
            opened = opened or level > 0
            if delta < 0 and opened and level <= 0:
                return i
        state = following
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
