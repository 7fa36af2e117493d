"""What the data side refuses, and how it says so: each check is a function of the data and the
keys it is asked about, raising a :class:`lgen.errors.ConfigError` or :class:`lgen.errors.DataError`
that names the key and the fix, before the output directory is touched or a model runs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from lgen.data.sources import file_format
from lgen.errors import ConfigError, DataError
from lgen.output import records


def columns(names: list[str], *, text: str | None, reference: str | None, id_column: str | None,
            keep: list[str]) -> str:
    """Refuse columns the dataset lacks and kept columns that would overwrite record fields; return
    the prompt column (default ``text`` if present, else the first column)."""
    if not names:
        raise DataError("the dataset is empty: it has no columns; check data.dataset_name / data.data_files")
    text = text if text is not None else ("text" if "text" in names else names[0])
    for key, value in (("text_column_name", text), ("reference_column_name", reference),
                       ("id_column_name", id_column)):
        if value is not None and value not in names:
            raise ConfigError(f"data.{key}={value!r} is not a column of the dataset; columns: {names}")
    clash = [c for c in keep if c in records.FIELDS]
    if clash:
        raise ConfigError(f"data.keep_columns: {clash} would overwrite record fields {list(records.FIELDS)}; "
                          "rename those columns or leave them out")
    missing = [c for c in keep if c not in names]
    if missing:
        raise ConfigError(f"data.keep_columns: {missing} are not columns of the dataset; columns: {names}")
    return text


def text_columns(raw: Any, *, text: str, reference: str | None) -> None:
    """Refuse a prompt or reference column that does not hold text (lists, dicts, numbers): each
    value would be generated from as its ``str()``, ``['a', 'b']``. A column of nulls alone (an
    empty CSV column reads as float64) passes: its rows are dropped as null."""
    import datasets

    for key, column in (("text_column_name", text), ("reference_column_name", reference)):
        if column is None:
            continue
        feature = raw.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null"):
            continue
        if all(v is None for v in raw[column]):
            continue
        if isinstance(feature, datasets.Value):
            kind = f"{feature.dtype} values"
        elif isinstance(feature, dict):
            kind = "dicts"
        elif isinstance(feature, (datasets.List, datasets.LargeList)):
            kind = f"lists ({feature})"
        else:
            kind = f"{type(feature).__name__} values"
        raise DataError(f"data.{key}={column!r} holds {kind}, not text; choose a text column "
                        f"(columns: {list(raw.column_names)}) or convert this one to strings")


def drop_hint(reasons: set[str], *, text: str, reference: str | None, max_window_size: int | None,
              sample_by: str, text_files: bool) -> str:
    """What to change, by why the rows were dropped. ``text_files``: the data is read as text."""
    hints = []
    empty = reasons & {"empty prompt", "null or missing prompt"}
    if empty:
        hints.append(f"every prompt is empty or null: check data.text_column_name={text!r}"
                     if empty == reasons else f"check data.text_column_name={text!r}")
    if "null or missing reference" in reasons:
        hints.append(f"check data.reference_column_name={reference!r}")
    if "prompt + reference > block_size - 1" in reasons:
        hints.append("prompt + reference must fit in block_size - 1: raise data.block_size or lower "
                     "data.max_window_size")
    if "chat prompt longer than max_window_size" in reasons:
        room = "raise data.max_window_size" if max_window_size is not None \
            else "raise data.block_size or lower model.max_new_tokens"
        hints.append(f"a chat prompt must fit max_window_size whole: {room}")
    if "shorter than max_window_size + max_new_tokens" in reasons:
        hint = "rows must hold at least max_window_size + max_new_tokens tokens: lower data.max_window_size"
        if sample_by == "line" and text_files:
            hint += ("; a text file is read one row per line, so for longer rows set data.sample_by: paragraph "
                     "(blank-line separated) or document")
        hints.append(hint)
    return "; ".join(hints)


def reads_text(dataset_name: str | None, data_files: list[str] | None) -> bool:
    """Whether the split is read as text (one row per line by default)."""
    return dataset_name == "text" or any(file_format(f) == "text" for f in data_files or [])


def json_values(examples: list[dict[str, Any]], features: Any, *, id_column: str | None, keep: list[str]) -> None:
    """Refuse ids and kept values that a JSON record cannot hold (bytes, datetime, Decimal ...)
    here, before the output directory is touched: the writer would fail on the first record,
    after ``overwrite_output_dir`` emptied it."""
    checks: list[tuple[str, str, Callable[[dict[str, Any]], Any], str]] = [
        (f"data.keep_columns: column {c!r}", c, lambda ex, c=c: ex["keep"][c],
         "leave it out of data.keep_columns, or convert the column to text first") for c in keep]
    if id_column is not None:
        checks.insert(0, (f"data.id_column_name={id_column!r}", id_column, lambda ex: ex["id"],
                          "choose another id column, or leave data.id_column_name unset to use the row index"))
    for key, column, value, fix in checks:
        for ex in examples:
            bad = _not_json(value(ex))
            if bad is not None:
                raise ConfigError(f"{key} holds {bad} values ({features[column]}; row {ex['row']}), which a JSON "
                                  f"record cannot hold; {fix}")


def unique_ids(examples: list[dict[str, Any]], features: Any, *, id_column: str | None) -> None:
    """Refuse ids that name several rows: their records would share a key, and resume and the
    writer would keep only one of them."""
    counts = Counter(records.example_key(ex) for ex in examples)
    repeated = [(key, n) for key, n in counts.items() if n > 1]
    if not repeated:
        return
    shown = ", ".join(f"{ident}{'' if part == (1, 1) else f' part {list(part)}'} ({n} times)"
                      for (ident, part), n in repeated[:3])
    mixed = id_column is not None and type(features[id_column]).__name__ == "Json"
    why = (" (the column mixes value types, which datasets reads as JSON values: 1 and \"1\" become the same "
           "id)" if mixed else "")
    raise DataError(f"data.id_column_name={id_column!r} does not identify the rows: "
                    f"{len(repeated)} ids appear more than once ({shown}{', ...' if len(repeated) > 3 else ''})"
                    f"{why}; choose a column whose values are unique, or leave data.id_column_name unset to "
                    "use the row index")


def batch_tokens(max_batch_tokens: int | str | None, *, need: int, what: str, samples: int) -> None:
    """Refuse an integer ``max_batch_tokens`` below ``need``, what the longest row's cache takes
    (``what`` says of what): the plan would exceed it, one row a batch, instead of keeping memory
    within it."""
    if not isinstance(max_batch_tokens, int) or max_batch_tokens >= need:
        return
    each = f" x {samples} samples" if samples > 1 else ""
    raise ConfigError(f"data.max_batch_tokens={max_batch_tokens} cannot hold one row: {what}{each} "
                      f"= {need} cache tokens; set it to at least {need}, or auto")


def _not_json(value: Any) -> str | None:
    """The type in ``value`` that JSON cannot hold, or None: ``{"a": b"x"}`` -> ``bytes``."""
    found: list[type] = []

    def default(obj: Any) -> Any:
        found.append(type(obj))
        raise TypeError

    try:
        json.dumps(value, default=default)
    except (TypeError, ValueError):
        kind = found[0] if found else type(value)
        return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return None
