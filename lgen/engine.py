"""A decode loop that drops finished rows: ``generate`` without the idle slots.

``model.generate`` keeps every row of a batch until the last one ends, so a batch whose rows stop
after 20, 40 and 256 tokens computes 3 x 256 slots for 316 useful tokens. This loop drives the
model's forward itself with a ``DynamicCache`` and, every ``compact_every`` steps, keeps only the
rows still running (``Cache.batch_select_indices``), so the work shrinks as rows finish:

    step:        0 ...  8 ... 16 ... 24 ...
    live rows:   64     64    41     17  ...   (rows that stopped are gone at the next compaction)

Samples of one prompt share its prefill: the prompt runs once and its cache is repeated
``num_return_sequences`` times. Sampling draws each row's noise from a hash of
(seed, row key, step, token), not from a global generator, so a row's sample does not depend on
which rows share its batch, their order, or the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig

from lgen.stopping import BraceMatchingCriteria

_SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "num_return_sequences", "max_new_tokens",
              "eos_token_id", "pad_token_id", "bos_token_id"}
# settings that change what is returned or how it is computed, not which tokens come out
_NEUTRAL = {"output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
            "use_cache", "max_length", "transformers_version", "cache_implementation", "compile_config",
            "disable_compile", "is_assistant"}


def unsupported(config: GenerationConfig) -> list[str]:
    """Generation settings this loop does not implement (``generate`` is used for those)."""
    diff = config.to_diff_dict()
    default = GenerationConfig().to_dict()
    bad = []
    for key, value in diff.items():
        if key in _SUPPORTED or key in _NEUTRAL or key.startswith("_"):
            continue
        if default.get(key, value) != value or key not in default:
            bad.append(key)
    if (config.num_beams or 1) > 1:
        bad.append("num_beams")
    return sorted(set(bad))


@dataclass
class Output:
    """``tokens``: ``[rows, max_new_tokens]`` generated ids, padded after each row stopped;
    ``brace_stop``: the step at which brace matching stopped each row (-1: never)."""

    tokens: torch.Tensor
    brace_stop: torch.Tensor
    slots: int  # row-steps computed, for the useful-slot fraction


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
    h = _mix(_mix(row_keys[:, None] * 1000003 + step) ^ (ids[None, :] * -7046029254386353131))
    u = ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    u = u.clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def _filter(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
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


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    brace: BraceMatchingCriteria | None = None,
    row_keys: torch.Tensor | None = None,
    compact_every: int = 8,
) -> Output:
    """Greedy or sampled decoding of a left-padded batch, dropping finished rows as it goes.

    Rows come out as ``generate`` orders them: prompt i's samples at ``i * n .. i * n + n - 1``.
    ``row_keys`` (one int64 per output row) seed sampling; they are required when sampling.
    """
    device = input_ids.device
    n = int(config.num_return_sequences or 1)
    rows = input_ids.shape[0] * n
    sample = bool(config.do_sample)
    if sample and row_keys is None:
        raise ValueError("sampling needs row_keys")
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    eos = torch.tensor(eos_token_ids or [-1], device=device)

    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        positions = positions.repeat_interleave(n, dim=0)
    next_pos = positions[:, -1:] + 1
    live = torch.arange(rows, device=device)  # output row of each live row
    brace_stop = torch.full((rows,), -1, dtype=torch.long, device=device)
    if brace is not None:
        brace.reset(rows, device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    keys = row_keys.to(device) if row_keys is not None else None
    slots = 0
    for step in range(max_new_tokens):
        if sample:
            scores = _filter(logits, config) + gumbel_noise(keys, step, logits.shape[-1])
            token = scores.argmax(dim=-1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, pad_token_id, token)
        tokens[live, step] = token
        slots += live.numel()
        finished = torch.isin(token, eos)
        if brace is not None:
            braced = brace.advance(token)
            brace_stop[live] = torch.where(braced, step, brace_stop[live])
            finished |= braced
        done = done | finished
        if step + 1 == max_new_tokens:
            break
        if (step + 1) % compact_every == 0:
            keep = (~done).nonzero().squeeze(1)  # the one host sync, every compact_every steps
            if keep.numel() == 0:
                break
            if keep.numel() < done.numel():
                cache.batch_select_indices(keep)
                live, token, done, next_pos = live[keep], token[keep], done[keep], next_pos[keep]
                attention_mask = attention_mask[keep]
                if keys is not None:
                    keys = keys[keep]
                if brace is not None:
                    brace.select(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    return Output(tokens, brace_stop, slots)
