"""A split's examples: its rows tokenized and cut into prompts (:func:`lgen.data.windows.make_examples`,
a cached ``datasets`` map), the dropped rows counted by reason and named in a warning, and each
example given its record fields (``keep``, ``meta``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lgen.data.windows import Windowing, make_examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Every prompt of a split, in dataset order; the rows each reason dropped (as ``meta.row``
    counts them, from 0), and how many prompts kept only their last ``max_window_size`` tokens."""

    examples: list[dict[str, Any]]
    dropped: dict[str, list[int]]
    truncated: int

    @property
    def drops(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.dropped.items()}


def build(raw: Any, *, tokenizer: Any, windowing: Windowing, subset: str | None, cached: bool = True,
          workers: int | None = None) -> Examples:
    """The examples of ``raw`` (a ``datasets.Dataset``) as ``windowing`` cuts them, the dropped rows
    warned of. ``subset`` goes into each example's ``meta``; ``cached``: reuse the map's cache."""
    processed = raw.map(make_examples, batched=True, with_indices=True, remove_columns=raw.column_names,
                        fn_kwargs={"tokenizer": tokenizer, "w": windowing}, load_from_cache_file=cached,
                        num_proc=workers, desc="tokenizing")
    dropped: dict[str, list[int]] = {}
    for reason, row in zip(processed["drop"], processed["row"]):
        if reason:
            dropped.setdefault(reason, []).append(row)
    for reason, rows in dropped.items():
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        log.warning("dropped %d of %d rows: %s (%s %s)", len(rows), len(raw), reason,
                    "row" if len(rows) == 1 else "rows", shown)
    kept = processed.filter(lambda d: not d, input_columns="drop")
    examples, truncated = [], 0
    source = raw[windowing.text] if windowing.chat else None
    for ex in kept:
        ex.pop("drop")
        truncated += ex.pop("truncated")
        ex["keep"] = {c: ex.pop(f"keep.{c}") for c in windowing.keep}
        ex["meta"] = {"subset": subset, "row": ex["row"]}
        if source is not None:  # the dataset's prompt, before the template (exports need it)
            ex["meta"]["prompt_text"] = str(source[ex["row"]])
        examples.append(ex)
    return Examples(examples, dropped, truncated)
