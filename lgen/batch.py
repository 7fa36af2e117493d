"""The contract between the data side and the decoders: a :class:`Batch` of left-padded prompts,
where it sits in a stream plan (:class:`Group`), and the row counts pools take (:func:`bucket`).

:mod:`lgen.data` makes batches; :mod:`lgen.decode` consumes them. Neither imports the other.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch


@dataclass
class Group:
    """Where a batch sits in a stream plan (continuous batching, :mod:`lgen.decode.continuous`)."""

    stream: int
    last: bool  # the stream's last group: decode until its pool is empty
    pool_rows: int  # rows the stream's pool holds
    pool_length: int  # cache positions a row may need: the stream's longest prompt + max_new_tokens
    group_rows: int  # rows the stream's largest group brings: the room the next group needs
    max_new_tokens: int  # the most tokens a row of the stream may generate
    final: bool  # the rank's last group: decode until every pool is empty
    budget: int  # cache positions (rows x positions) the pools decoding together may hold


@dataclass
class Batch:
    """Left-padded prompts and what their records need. ``max_new_tokens`` is this batch's (with
    ``auto``: ``block_size`` minus its longest prompt); a ``padding`` batch is run but never written;
    ``group`` places a batch in its stream (None in a batch plan)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    _: KW_ONLY
    max_new_tokens: int
    padding: bool
    examples: list[dict[str, Any]]
    group: Group | None = None



def bucket(rows: int, least: int) -> int:
    """The smallest of 8, 12, 16, 24, 32, 48, ... (at least ``least``) that holds ``rows``: the sizes
    pools and CUDA-graph batches take, so that few shapes are captured."""
    size = 1 << max(rows - 1, 0).bit_length()  # next power of two
    if size // 4 * 3 >= rows:
        size = size // 4 * 3
    return max(least, size)


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (``[rows, longest]``) of prompts padded on the left:
    ``[[5, 6], [7]]`` -> ids ``[[5, 6], [pad, 7]]``, mask ``[[1, 1], [0, 1]]``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, ids in enumerate(prompts):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids):] = 1
    return input_ids, attention_mask
