"""The plan: which examples run together and in which order, and which part of it each rank runs.

The plan is computed from the data and the settings alone, the same on every rank, so a record
does not depend on the number of ranks. Two forms:

* streams (continuous batching, :mod:`lgen.decode.continuous`): the examples, longest first, are dealt
  into as many streams as it takes to keep each stream's rows within one pool; a stream is a list
  of prompt groups prefilled together. Ranks take whole streams, the costliest first to the least
  loaded rank. Example: 10 prompts, a pool of 4 rows, groups of 2 -> 3 streams of prompts
  ``[0 3 6 9] [1 4 7] [2 5 8]`` (by length), groups ``[[0 3] [6 9]] [[1 4] [7]] [[2 5] [8]]``.
* batches (ranks in lockstep under ZeRO-3, and ``engine: generate``): batches of at most
  ``per_device_batch_size`` prompts (and ``max_batch_tokens``), dealt round-robin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import torch

from lgen.batch import Group, bucket
from lgen.data.lengths import Lengths

PADDING = -1  # a batch ``[PADDING]`` runs one row of the padding example and writes nothing
# rows decoding together on a CPU, where there is no memory budget: past this a CPU step gains
# little from more rows (docs/performance.md)
CPU_POOL_ROWS = 32
# the most rows of one stream's pool: past this a step is bound by reading the cache, so a bigger
# pool buys little, while one more stream gives one more GPU work
MAX_POOL_ROWS = 2048


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


def plan_streams(lengths: list[int], *, samples: int, pool_rows: int, group_size: int) -> list[list[list[int]]]:
    """Streams of prompt groups, as lists of example indices (see the module docstring): as many
    streams as ``len(lengths) * samples`` rows need pools of ``pool_rows``, each dealt examples
    longest first in turn, cut into groups of at most ``group_size`` prompts."""
    count = max(1, math.ceil(len(lengths) * samples / pool_rows))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    streams = [order[s::count] for s in range(count)]
    return [[stream[g: g + group_size] for g in range(0, len(stream), group_size)] for stream in streams if stream]


def deal_streams(costs: list[int], rank: int, world_size: int) -> list[int]:
    """The streams rank ``rank`` runs, in order: costliest first to the least loaded rank (ties to
    the lower stream and rank), so ranks finish close together."""
    loads = [0] * world_size
    mine: list[int] = []
    for s in sorted(range(len(costs)), key=lambda s: (-costs[s], s)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += costs[s]
        if r == rank:
            mine.append(s)
    return sorted(mine)


def rank_groups(lengths: list[int], rule: Lengths, *, samples: int, batch_tokens: int | None, batch_size: int,
                rank: int, world_size: int) -> list[list[tuple[int, Group | None]]]:
    """Rank ``rank``'s prompt groups, stream after stream, each example index with its
    :class:`lgen.batch.Group`. The pool policy: a pool holds what ``batch_tokens`` allows of the
    longest row (no budget: :data:`CPU_POOL_ROWS`), at most :data:`MAX_POOL_ROWS` and at least one
    prompt's samples; a group is at most ``batch_size`` prompts and fits the pool. A rank left
    with nothing runs one padding group."""
    length = rule.row_span(max(lengths, default=1))
    pool_rows = CPU_POOL_ROWS if batch_tokens is None else max(1, batch_tokens // length)
    pool_rows = max(min(pool_rows, MAX_POOL_ROWS), samples)
    group_size = max(1, min(batch_size, pool_rows // samples))
    streams = plan_streams(lengths, samples=samples, pool_rows=pool_rows, group_size=group_size)
    costs = [sum(rule.row_span(lengths[i]) * samples for g in stream for i in g) for stream in streams]
    budget = batch_tokens if batch_tokens is not None else pool_rows * length
    groups: list[list[tuple[int, Group | None]]] = []
    for s in deal_streams(costs, rank, world_size):
        stream = streams[s]
        rows = sum(len(g) for g in stream) * samples
        longest = max(lengths[i] for g in stream for i in g)
        span = rule.row_span(longest)
        mnt = span - min(lengths[i] for g in stream for i in g) if rule.max_new_tokens == "auto" \
            else int(rule.max_new_tokens)
        size = min(pool_rows, bucket(rows, 8))
        for k, g in enumerate(stream):
            info = Group(stream=s, last=k == len(stream) - 1, pool_rows=size, pool_length=span,
                         group_rows=max(len(x) for x in stream) * samples, max_new_tokens=mnt,
                         final=False, budget=budget)
            groups.append([(i, info) for i in g])
    if not groups:
        return [[(PADDING, None)]]
    groups[-1] = [(i, dataclasses.replace(info, final=True)) for i, info in groups[-1]]
    return groups


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
