"""The record: one JSONL line per (row, window, sample), its key, and how a batch's records are built.

A record looks like::

    {"id": "java/5", "part": [1, 1], "seq": [1, 1], "prompt": "...", "reference": "",
     "prediction": "...", "finish_reason": "brace_matching", "meta": {"subset": null, "row": 5}, "language": "java"}

``(id, part, seq)`` names it: ``part`` is ``[window, windows]`` (1-based), ``seq`` is
``[sample, num_return_sequences]``. The columns in ``data.keep_columns`` follow ``meta``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lgen.decode.stopping import Finished

FIELDS = ("id", "part", "seq", "prompt", "reference", "prediction", "finish_reason", "meta")

ExampleKey = tuple[str, tuple[int, ...]]  # (id as JSON text, part): one prompt
RecordKey = tuple[str, tuple[int, ...], int]  # (id as JSON text, part, sample): one record


def id_key(value: Any) -> str:
    """An id as JSON text, so ``1`` and ``"1"`` stay different keys and any JSON value can be one."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def example_key(example: dict[str, Any]) -> ExampleKey:
    return id_key(example["id"]), tuple(example["part"])


def record_key(record: dict[str, Any]) -> RecordKey:
    return id_key(record["id"]), tuple(record["part"]), int(record["seq"][0])


def complete_examples(keys: set[RecordKey], samples: int) -> set[ExampleKey]:
    """The (id, part) pairs of ``keys`` whose every sample is there."""
    seqs: dict[ExampleKey, set[int]] = {}
    for ident, part, seq in keys:
        seqs.setdefault((ident, part), set()).add(seq)
    return {k for k, s in seqs.items() if s >= set(range(1, samples + 1))}


@dataclass(frozen=True, kw_only=True)
class BatchRecords:
    """What ``predict_step`` returns for one batch: its records, the generated tokens of each, the
    batch's generation seconds, the row-steps the engine computed (``slots``), and the rows a stop
    dropped unfinished (``dropped``: generated again on resume)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    slots: int = 0
    dropped: int = 0


def build(rows: list[tuple[dict[str, Any], int, Finished]], *, samples: int,
          tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """One record per finished row: (example, sample number from 1, the row cut where it ended)."""
    prompts: dict[int, str] = {}
    records = []
    for ex, sample, done in rows:
        if id(ex) not in prompts:
            prompts[id(ex)] = tokenizer.decode(ex["prompt_ids"], skip_special_tokens=False)
        records.append({
            "id": ex["id"],
            "part": list(ex["part"]),
            "seq": [sample, samples],
            "prompt": prompts[id(ex)],
            "reference": ex["reference"],
            "prediction": done.text,
            "finish_reason": done.reason,
            "meta": ex["meta"],
            **ex["keep"],
        })
    return records
