"""``lgen export``: an output directory in the files scorers read.

* ``humaneval`` (OpenAI's ``human-eval``, ``evaluate_functional_correctness``): JSON Lines of
  ``{"task_id": id, "completion": prediction}``, one per record in dataset order (a task's samples
  in ``seq`` order).
* ``bigcode`` (bigcode-evaluation-harness, ``--load_generations_path``): a JSON list with one list
  per source row in dataset order, each holding the row's samples as prompt + prediction. The
  prompt is the dataset's text (``meta.prompt_text`` when a chat template wrapped it).

``extract_code`` keeps the code of an instruct model's Markdown answer: the first fenced block
(```` ```lang ```` ... ```` ``` ````, or to the end when the row stopped before the fence closed); a
lone bare fence after text closes code that began without one, and the text before it is kept; a
prediction without a fence is kept whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from lgen.merge import ordered_lines
from lgen.outputs import write_json, write_lines

Format = Literal["humaneval", "bigcode"]
FENCE = re.compile(r"```([^\n`]*)\n?")


def extract_code(text: str) -> str:
    """The code of a Markdown answer (see the module docstring), e.g. ``"Sure:\n```py\nx = 1\n```"``
    -> ``"x = 1\n"``; ``"x = 1\n```\nThat sets x."`` -> ``"x = 1\n"``."""
    fences = list(FENCE.finditer(text))
    if not fences:
        return text
    first = fences[0]
    if len(fences) == 1 and not first.group(1).strip() and text[: first.start()].strip():
        return text[: first.start()]  # a bare fence closing code that opened without one
    return text[first.end(): fences[1].start() if len(fences) > 1 else len(text)]


def default_path(output_dir: str | Path, split: str, fmt: Format) -> Path:
    return Path(output_dir) / (f"humaneval.{split}.jsonl" if fmt == "humaneval" else f"bigcode.{split}.json")


def export(output_dir: str | Path, split: str, fmt: Format, *, output: str | Path | None = None,
           allow_partial: bool = False, code: bool = False) -> Path:
    """Write ``output_dir``'s records of ``split`` for a scorer (see the module docstring); fails,
    naming how many, when records are missing, unless ``allow_partial``."""
    path = Path(output) if output is not None else default_path(output_dir, split, fmt)
    records = (json.loads(line) for line in ordered_lines(output_dir, split, allow_partial=allow_partial))

    def prediction(record: dict[str, Any]) -> str:
        return extract_code(record["prediction"]) if code else record["prediction"]

    if fmt == "humaneval":
        lines = (json.dumps({"task_id": r["id"], "completion": prediction(r)}, ensure_ascii=False).encode() + b"\n"
                 for r in records)
        write_lines(path, lines)
    else:
        write_json(path, json.dumps(list(_by_row(records, prediction)), ensure_ascii=False) + "\n")
    return path


def _by_row(records: Iterator[dict[str, Any]], prediction) -> Iterator[list[str]]:
    """Records in dataset order, grouped by source row: each row's prompt + prediction list."""
    row, group = None, []
    for r in records:
        if r["meta"]["row"] != row and group:
            yield group
            group = []
        row = r["meta"]["row"]
        group.append(r["meta"].get("prompt_text", r["prompt"]) + prediction(r))
    if group:
        yield group
