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


def noise_at(row_keys: torch.Tensor, steps: int | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise for the token ``ids`` (``[rows, n]``, or ``[1, n]`` for every row) of each row at
    its step (one int for all rows, or one per row): a pure function of (row key, step, token id)."""
    steps = steps[:, None] if isinstance(steps, torch.Tensor) else steps
    h = _mix(_mix(row_keys[:, None] * 1000003 + steps + 7146057326463496217) ^ (ids * -7046029254386353131))
    # the arithmetic shifts above leave the sign bit clear: take the 53 bits below it
    u = ((h >> 10) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    u = u.clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def gumbel_noise(row_keys: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` Gumbel noise, a pure function of (row key, step, token id)."""
    return noise_at(row_keys, step, torch.arange(vocab, device=row_keys.device, dtype=torch.int64)[None, :])


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k and top-p over the whole vocabulary, as ``generate`` applies them."""
    if config.temperature is not None and config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k:
        k = min(int(config.top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1, stable=True)  # ties: lower ids first
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - config.top_p)
        remove[:, -1] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


# candidates the top-p-only draw looks at; a row whose top-p set reaches past them is drawn over the vocabulary
TOP_P_CANDIDATES = 64


def _candidate_draw(logits: torch.Tensor, config: GenerationConfig, keys: torch.Tensor,
                    steps: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draw over the whole vocabulary, computed on the few tokens the filters can keep.

    With top-k every token outside the top k is -inf, and with top-p every token outside the
    smallest set that holds ``top_p`` of the probability, so neither the top-p sort nor the noise
    needs the other ~50k tokens. Candidates: with top-k the top 2k + 16 (ties with the k-th value
    stay in, as ``generate`` keeps them); with top-p alone the top ``TOP_P_CANDIDATES``, and the
    second value says which rows' top-p set they hold (the others must be drawn over the
    vocabulary). Ties are settled by token id, as over the vocabulary: at the top-p boundary the
    lower ids of equally likely tokens go first (a stable ascending sort), and a draw's ties go to
    the lowest id (an argmax).
    """
    vocab = logits.shape[-1]
    k = int(config.top_k or 0)
    if config.temperature is not None and config.temperature != 1.0:
        logits = logits / config.temperature
    values, ids = torch.topk(logits, min(vocab, 2 * k + 16 if k else TOP_P_CANDIDATES), dim=-1)
    by_id = torch.sort(ids, dim=-1, stable=True).indices  # then by value: ascending, ties in id order
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_value = torch.sort(values, dim=-1, stable=True).indices
    values, ids = values.gather(-1, by_value).flip(-1), ids.gather(-1, by_value).flip(-1)  # descending
    keep = values >= values[:, k - 1: k] if k else torch.ones_like(values, dtype=torch.bool)
    covered = None
    if config.top_p is not None and config.top_p < 1.0:
        if k:  # the probabilities over the top k, as softmax over the vocabulary gives them (the rest is -inf)
            probs = values.masked_fill(~keep, float("-inf")).softmax(dim=-1)
            below = 0.0
        else:  # the probability mass of the tokens below the candidates comes first in the ascending sum
            probs = (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
            held = probs.sum(dim=-1, keepdim=True)
            below, covered = 1 - held, held[:, 0] >= config.top_p
        remove = below + probs.flip(-1).cumsum(dim=-1) <= (1 - config.top_p)  # ascending, as generate sums
        remove[:, -1] = False  # keep at least one token
        keep &= ~remove.flip(-1)
    score = values.masked_fill(~keep, float("-inf")) + noise_at(keys, steps, ids)
    best = score.max(dim=-1, keepdim=True).values
    return torch.where(score == best, ids, vocab).min(dim=-1).values, covered


def next_tokens(logits: torch.Tensor, config: GenerationConfig, keys: torch.Tensor | None,
                steps: int | torch.Tensor) -> torch.Tensor:
    """Greedy, or one draw per row from its own stream (``keys``, one per row, at ``steps``: one
    int for every row, or each row's own step)."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    k = int(config.top_k or 0)
    top_p = config.top_p is not None and config.top_p < 1.0
    if (k and 2 * k + 16 < logits.shape[-1]) or (not k and top_p and TOP_P_CANDIDATES < logits.shape[-1]):
        tokens, covered = _candidate_draw(logits, config, keys, steps)
        if covered is None or bool(covered.all()):
            return tokens
        rows = (~covered).nonzero().squeeze(1)  # rows whose top-p set is wider than the candidates
        row_steps = steps[rows] if isinstance(steps, torch.Tensor) else steps
        full = (filter_logits(logits[rows], config) + gumbel_noise(keys[rows], row_steps, logits.shape[-1]))
        return tokens.index_copy(0, rows, full.argmax(dim=-1))
    return (filter_logits(logits, config) + gumbel_noise(keys, steps, logits.shape[-1])).argmax(dim=-1)
