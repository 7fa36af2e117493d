"""An independent, character-by-character brace matcher: the specification the token FSM must meet.

Written as plain string scanning (no tables) so that it shares no code with ``lgen.decode.stopping``.
"""

from __future__ import annotations


def reference_close(text: str, start_level: int = 1, language: str = "c") -> tuple[int, int] | None:
    """(cut, decided): the index of the brace that brings the level, counted in code only, to zero,
    and the index of the character at which that is known. They differ only for a Rust label or
    lifetime quote before ``}`` (``'}x``): only the character after the ``}`` shows it is not ``'}'``."""
    level, i, n = start_level, 0, len(text)

    def brace(ch: str) -> int:
        return 1 if ch == "{" else -1 if ch == "}" else 0

    while i < n:
        ch = text[i]
        if language == "plain":
            level += brace(ch)
            if level <= 0:
                return i, i
            i += 1
            continue
        if language == "python":
            if ch == "#":
                j = text.find("\n", i)
                if j < 0:
                    return None
                i = j + 1
                continue
            if ch in "\"'":
                j = i + 1
                while j < n and text[j] not in (ch, "\n"):
                    j += 2 if text[j] == "\\" else 1
                if j >= n:
                    return None
                i = j + 1
                continue
        else:
            if text.startswith("//", i):
                j = text.find("\n", i)
                if j < 0:
                    return None
                i = j + 1
                continue
            if text.startswith("/*", i):
                j = text.find("*/", i + 2)
                if j < 0:
                    return None
                i = j + 2
                continue
            if ch == '"':
                j = i + 1
                while j < n and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
                if j >= n:
                    return None
                i = j + 1
                continue
            if ch == "'":
                nxt = text[i + 1] if i + 1 < n else None
                if nxt is None:
                    return None
                if nxt in "'\n":  # '' or a lone quote at the end of a line: both characters are done
                    i += 2
                    continue
                if nxt == "\\":  # escaped char literal: '\n', '\'', '\u{7b}' ... up to the closing quote
                    if i + 2 >= n:
                        return None
                    if text[i + 2] == "\n":
                        i += 3
                        continue
                    j = i + 3
                    while j < n and text[j] not in "'\n":
                        j += 1
                    if j >= n:
                        return None
                    i = j + 1
                    continue
                if i + 2 >= n:
                    return None  # undecided: literal or lifetime
                if text[i + 2] == "'":  # 'x'
                    i += 3
                    continue
                # a lifetime or label ('a, 'outer): the character after the quote is code
                level += brace(nxt)
                if level <= 0:
                    return i + 1, i + 2
                i += 2
                continue
        level += brace(ch)
        if level <= 0:
            return i, i
        i += 1
    return None
