"""Sampling that gives each output row its own random stream.

Each row draws its noise from a hash of (row key, step, token id), not from a global generator, so
a row's sample does not depend on which rows share its batch, their order, or the number of ranks.
The row key hashes (seed, id, part, sample). Sampling is then the Gumbel-max trick: the argmax of
the filtered logits plus Gumbel noise is a draw from their softmax.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from transformers import GenerationConfig


def row_keys(seed: int, examples: list[dict[str, Any]], samples: int, device: torch.device) -> torch.Tensor:
    """One int64 per output row from (seed, id, part, sample): the row's sampling stream."""
    keys = []
    for ex in examples:
        for k in range(1, samples + 1):
            text = json.dumps([seed, ex["id"], list(ex["part"]), k], sort_keys=True, default=str)
            keys.append(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True))
    return torch.tensor(keys, dtype=torch.int64, device=device)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64 finaliser; int64 arithmetic wraps)."""
    x = x ^ (x >> 31)
    x = x * -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
    x = x ^ (x >> 29)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    return x ^ (x >> 32)


def gumbel_noise(row_keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` Gumbel noise, a pure function of (row key, step, token id)."""
    ids = torch.arange(vocab, device=row_keys.device, dtype=torch.int64)
    h = _mix(_mix(row_keys[:, None] * 1000003 + step + 7146057326463496217) ^ (ids[None, :] * -7046029254386353131))
    # the arithmetic shifts above leave the sign bit clear: take the 53 bits below it
    u = ((h >> 10) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    u = u.clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k and top-p, as ``generate`` applies them."""
    if config.temperature is not None and config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k:
        k = min(int(config.top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - config.top_p)
        remove[:, -1] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: GenerationConfig, keys: torch.Tensor | None, step: int) -> torch.Tensor:
    """Greedy, or one draw per row from its own stream (``keys``, one per row)."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    return (filter_logits(logits, config) + gumbel_noise(keys, step, logits.shape[-1])).argmax(dim=-1)
