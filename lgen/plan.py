"""The batch plan: which examples go together and in which order, and which batches each rank runs.

The plan is computed from the data and the settings alone, the same on every rank, and whole
batches are dealt to ranks round-robin, so a record does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

PADDING = -1  # a batch ``[PADDING]`` runs one row of the padding example and writes nothing


def plan_batches(lengths: list[int], *, batch_size: int, batch_tokens: int | None, row_tokens: Callable[[int], int],
         sort_by_length: bool = True) -> list[list[int]]:
    """All batches, as lists of example indices, in the order they run.

    ``lengths`` are the prompt lengths; a batch holds at most ``batch_size`` examples and, with
    ``batch_tokens``, at most that many cache tokens, ``row_tokens(longest prompt)`` per example.
    ``sort_by_length`` plans longest first, so batches hold prompts of similar length (less padding).
    """
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is not None and len(cur) < batch_size:
            longest = max(lengths[j] for j in cur + [i])
            if batch_tokens is None or (len(cur) + 1) * row_tokens(longest) <= batch_tokens:
                cur.append(i)
                continue
        batches.append([i])
    return batches


def deal(batches: list[list[int]], rank: int, world_size: int, *, equalize: bool = False) -> list[list[int]]:
    """Rank ``rank``'s batches, dealt round-robin. A rank left with none gets one padding batch
    (Lightning needs at least one); with ``equalize`` (ranks in lockstep) every rank gets the same count."""
    mine = batches[rank::world_size]
    most = math.ceil(len(batches) / world_size) if equalize else 1
    if len(mine) < most:
        mine = mine + [[PADDING]] * (most - len(mine))
    return mine


class PlannedBatches(torch.utils.data.Sampler):
    """A fixed list of batches (a batch sampler): the plan, not a shuffle or a distributed split."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
