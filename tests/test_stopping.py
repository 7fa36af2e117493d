from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_close

from lgen.decode.braces import build_token_table, find_close
from lgen.decode.stopping import (
    BraceMatching,
    EndOfSequence,
    GenerateCriteria,
    Length,
    StopRule,
    StopRules,
    StopStrings,
)


def run_fsm(chunks: list[str], start_level: int = 1, language: str = "c", prompt_len: int = 3) -> int | None:
    """Feed ``chunks`` (one token each) to brace matching as generate would; return the stop step."""
    vocab = sorted(set(chunks)) + ["<pad>"]
    table = build_token_table(vocab, language)
    rules = StopRules([BraceMatching(table, start_level=start_level, language=language)])
    criteria = GenerateCriteria(rules, prompt_width=prompt_len, max_new_tokens=len(chunks))
    ids = torch.full((1, prompt_len), len(vocab) - 1)
    stopped_at = None
    for k, chunk in enumerate(chunks):
        ids = torch.cat([ids, torch.tensor([[vocab.index(chunk)]])], dim=1)
        done = criteria(ids, None)
        assert done.shape == (1,) and done.dtype == torch.bool
        if done[0] and stopped_at is None:
            stopped_at = k
    rule, step = rules.replay(ids[:, prompt_len:], len(chunks))
    assert int(rule[0]) == (-1 if stopped_at is None else 0)
    assert (None if step[0] < 0 else int(step[0])) == stopped_at  # the replay agrees with generate's stop
    return stopped_at


def expected_step(chunks: list[str], start_level: int = 1, language: str = "c") -> int | None:
    """The token holding the character at which the reference lexer knows the level hit zero."""
    ref = reference_close("".join(chunks), start_level, language)
    if ref is None:
        return None
    end = 0
    for k, chunk in enumerate(chunks):
        end += len(chunk)
        if ref[1] < end:
            return k
    raise AssertionError("unreachable")


TRAPS = [
    # (language, generated text, text up to and including the closing brace)
    ("c", '\n    s = "}";\n    return s;\n}\nint x;', '\n    s = "}";\n    return s;\n}'),
    ("c", '\n    s = "a\\"}";\n}\n', '\n    s = "a\\"}";\n}'),
    ("c", '\n    s = "a\\\\";\n}\n', '\n    s = "a\\\\";\n}'),
    ("c", "\n    c = '}';\n    d = '{';\n}\n", "\n    c = '}';\n    d = '{';\n}"),
    ("c", "\n    c = '\\'';\n}", "\n    c = '\\'';\n}"),
    ("c", "\n    // a } in a comment\n}", "\n    // a } in a comment\n}"),
    ("c", "\n    /* } and { */ x++;\n}", "\n    /* } and { */ x++;\n}"),
    ("c", "\n    x = a / b;\n}", "\n    x = a / b;\n}"),
    ("c", "\n    let r: &'a str = x;\n    'outer: loop { break 'outer; }\n}", None),
    ("c", "\n    println!(\"{}\", '{');\n}", "\n    println!(\"{}\", '{');\n}"),
    ("c", "\n    let c = '\\u{7d}';\n}", "\n    let c = '\\u{7d}';\n}"),
    ("c", " return x; }} else {", " return x; }"),
    ("c", "\n    if (a) { b(); } else { c(); }\n}\n\nint main() {", "\n    if (a) { b(); } else { c(); }\n}"),
    ("c", "\n    const s = `${x}`;\n}", "\n    const s = `${x}`;\n}"),
    ("python", "\n    d = {'}': 1}  # }\n}", "\n    d = {'}': 1}  # }\n}"),
    ("plain", ' s = "}";', ' s = "}'),
]


@pytest.mark.parametrize("language,text,expected", TRAPS)
def test_traps_cut_at_the_closing_brace(language, text, expected):
    if expected is None:  # the lifetime trap: closes at the final brace
        expected = text
    cut = find_close(text, 1, language)
    assert cut is not None and text[: cut + 1] == expected
    assert reference_close(text, 1, language)[0] == cut


@pytest.mark.parametrize("language,text,expected", TRAPS)
def test_traps_stop_on_the_token_holding_the_brace(language, text, expected):
    # one token per character, then in chunks of 3 characters: the stop step is the same character
    for size in (1, 3):
        chunks = [text[i: i + size] for i in range(0, len(text), size)]
        assert run_fsm(chunks, 1, language) == expected_step(chunks, 1, language)


def test_token_crossing_zero_stops_mid_token():
    chunks = ["\n", "  x", ";", "\n}}", " else {"]
    assert run_fsm(chunks) == 3
    assert find_close("".join(chunks)) == len("\n  x;\n}") - 1


def test_start_level_two_needs_two_closes():
    assert run_fsm(["}", " x", "}", "}"], start_level=2) == 2


ALPHABET = st.sampled_from(list("{}{}\"'/*\\\n#ab ") + ["'a", "'{'", "\\\"", "//", "/*", "*/", "}}", "{\n", "'\\''"])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(ALPHABET, min_size=1, max_size=40), cuts=st.lists(st.integers(1, 4), min_size=60, max_size=60),
       language=st.sampled_from(["c", "python", "plain"]), start=st.integers(1, 3))
def test_fsm_matches_reference_on_random_code_and_tokenizations(pieces, cuts, language, start):
    text = "".join(pieces)
    chunks, i, k = [], 0, 0
    while i < len(text):
        chunks.append(text[i: i + cuts[k % len(cuts)]])
        i += cuts[k % len(cuts)]
        k += 1
    assert run_fsm(chunks, start, language) == expected_step(chunks, start, language)
    ref = reference_close(text, start, language)
    assert find_close(text, start, language) == (None if ref is None else ref[0])


REALISTIC = [
    "\n    if (s.length() == 0) {\n        return \"{}\";\n    }\n    return s + '}';\n}\n",
    "\n    let v: Vec<&'a str> = x.split('{').collect();\n    /* } */ v\n}\n\nfn g() {",
    "\n\tfmt.Printf(\"%v}\\n\", x) // }\n\treturn\n}\n",
    "\n    const o = {a: {b: 1}};\n    return `}` + o;\n}",
]


@settings(max_examples=100, deadline=None)
@given(code=st.sampled_from(REALISTIC), cuts=st.lists(st.integers(1, 6), min_size=80, max_size=80))
def test_fsm_matches_reference_on_realistic_code(code, cuts):
    chunks, i, k = [], 0, 0
    while i < len(code):
        chunks.append(code[i: i + cuts[k]])
        i += cuts[k]
        k += 1
    step = run_fsm(chunks)
    assert step is not None and step == expected_step(chunks)


def test_rows_are_independent_of_the_batch():
    texts = ["\n  a;\n}", "\n  s = \"}\";\n}", "\n  // }\n  b;\n}", " x }} y"]
    chunked = [[t[i: i + 2] for i in range(0, len(t), 2)] for t in texts]
    vocab = sorted({c for ch in chunked for c in ch}) + ["<pad>"]
    table = build_token_table(vocab, "c")
    steps = max(len(c) for c in chunked)
    rows = [[vocab.index(c) for c in ch] + [len(vocab) - 1] * (steps - len(ch)) for ch in chunked]
    alone = [run_fsm(ch) for ch in chunked]
    for batch in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0, 2] * 20):
        rules = StopRules([BraceMatching(table, start_level=1, language="c")])
        _, step = rules.replay(torch.tensor([rows[b] for b in batch]), steps)
        assert [None if s < 0 else s for s in step.tolist()] == [alone[b] for b in batch]


def test_each_batch_starts_afresh():
    table = build_token_table(["}", "x", "<pad>"], "c")
    rules = StopRules([BraceMatching(table, start_level=1, language="c")])
    assert rules.replay(torch.tensor([[0]]), 1)[1].tolist() == [0]
    assert rules.replay(torch.tensor([[1]]), 1)[1].tolist() == [-1]  # the level is 1 again, not 0


class FakeTokenizer:
    """Decodes ids as characters of ``chars`` so finish() can be checked by hand."""

    def __init__(self, chars: str) -> None:
        self.chars = chars

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.chars[i] for i in ids if not (skip_special_tokens and self.chars[i] == "$"))

    def batch_decode(self, rows, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return [self.decode(r, skip_special_tokens) for r in rows]


CHARS = "ab}{\"$;\n"  # "$" is EOS and pad


def rules_for(tok, *extra: StopRule, keep_stop_string: bool = False) -> StopRules:
    table = build_token_table(list(CHARS[:5]) + ["", "", ""], "c")
    return StopRules([BraceMatching(table, start_level=1, language="c"),
                      StopStrings([";"], tok, keep=keep_stop_string), *extra,
                      EndOfSequence([CHARS.index("$")]), Length()])


def finished(rules: StopRules, tok, rows: list[str]) -> list[tuple[str, str, int]]:
    ids = torch.tensor([[CHARS.index(c) for c in r] for r in rows])
    out = rules.finish(ids, *rules.replay(ids, ids.shape[1]), tok)
    return [(f.text, f.reason, f.tokens) for f in out]


def test_finish_reasons_and_cuts():
    tok = FakeTokenizer(CHARS)
    rows = ["ab}a$$", 'a"}"}$', "a$bbbb", "aabbab", "ab;}b$", "a;$bbb"]
    assert finished(rules_for(tok), tok, rows) == [
        ("ab}", "brace_matching", 3),
        ('a"}"}', "brace_matching", 5),
        ("a", "stop", 2),
        ("aabbab", "length", 6),
        ("ab", "stop_string", 3),  # the stop string ends the text before the brace does
        ("a", "stop_string", 2),  # and counts before an EOS right after it
    ]
    assert finished(rules_for(tok, keep_stop_string=True), tok, rows)[4] == ("ab;", "stop_string", 3)


class BlankLines(StopRule):
    """A rule written against the interface alone: end a row at its first blank line."""

    reason = "stop_string"

    def scan(self, generated, new, lengths=None):
        return ["\n\n" in "".join(CHARS[i] for i in row) for row in generated.tolist()]

    def cut(self, text, fired):
        at = text.find("\n\n")
        return None if at < 0 else (at, text[:at])

    def tokens(self, row, step, limit):
        return "".join(CHARS[i] for i in row).find("\n\n") + 2


def test_a_new_rule_needs_only_the_interface():
    tok = FakeTokenizer(CHARS)
    rules = rules_for(tok, BlankLines())
    assert finished(rules, tok, ["ab\n\nb}", "a\nb}\n\n"]) == [("ab", "stop_string", 4), ("a\nb}", "brace_matching", 4)]
    ids = torch.tensor([[CHARS.index(c) for c in "ab\n\nbb"], [CHARS.index(c) for c in "aaaaaa"]])
    assert rules.scan(ids, 4) == [True, False]
