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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig

from lgen.attention import packed_decode
from lgen.models import base_model, whole_blocks
from lgen.stopping import BraceMatchingCriteria

_SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "num_return_sequences", "max_new_tokens",
              "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings"}
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
    h = _mix(_mix(row_keys[:, None] * 1000003 + step + 7146057326463496217) ^ (ids[None, :] * -7046029254386353131))
    # the arithmetic shifts above leave the sign bit clear: take the 53 bits below it
    u = ((h >> 10) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    u = u.clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def _kv_layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's cache."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def cache_bytes_per_token(model: torch.nn.Module) -> int:
    """Key and value bytes one token takes across all layers."""
    layers, heads, head_dim = _kv_layout(model)
    return 2 * layers * heads * head_dim * next(model.parameters()).element_size()


def token_budget(model: torch.nn.Module, free_bytes: int, share: float = 0.8, row_span: int | None = None,
                 prompt_width: int = 0) -> int:
    """Batch tokens (prompt + new tokens, every sample) that fit in ``share`` of ``free_bytes``.

    Per token: the cache twice (a compaction copies the live rows' cache before the old one is
    freed), the prefill's widest activations (the MLP's gate, up and product, and a few hidden-size
    tensors) and its attention mask (``prompt_width`` entries of up to 8 bytes in its making). Per
    row (one sample): scores over the vocabulary (the logits, a float32 copy, and sampling's
    temporaries, ~40 bytes a token id), spread over ``row_span``, the fewest tokens a row holds.
    """
    cfg = model.config.get_text_config(decoder=True)
    elem = next(model.parameters()).element_size()
    width = 3 * (getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size) + 4 * cfg.hidden_size
    per_token = 2 * cache_bytes_per_token(model) + width * elem + 8 * prompt_width
    if row_span:
        per_token += -(-cfg.vocab_size * 40 // row_span)  # ceiling
    return int(free_bytes * share) // per_token


def _idle_forward(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    return model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False).logits


def _all_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _any_rank(flag: bool, device: torch.device) -> bool:
    return _all_max(int(flag), device) > 0


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


class SlotCache:
    """A KV cache of fixed shape per layer (``[rows, kv_heads, length, head_dim]``) written at the
    positions held in the device tensor ``write_at``: nothing in a decode step depends on host
    values, so the step can be captured once as a CUDA graph and replayed. It implements the part
    of transformers' ``Cache`` interface that attention layers call (``update``)."""

    is_compileable = True

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.k, self.v, self.write_at = k, v, write_at

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.k[layer_idx].index_copy_(2, self.write_at, key_states)
        self.v[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.k[layer_idx], self.v[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def select(self, rows: torch.Tensor) -> SlotCache:
        return SlotCache([k[rows] for k in self.k], [v[rows] for v in self.v], self.write_at)


def compile_layers(model: torch.nn.Module, dynamic: bool | None = None) -> int:
    """``torch.compile`` each decoder layer (the classes a transformers model lists in
    ``_no_split_modules``) for :class:`_Graphed`'s decode steps, which then replay fused kernels.

    Compiling the layers, not the whole model, keeps the compiled code small: dynamo traces each
    layer (its cache index is a constant) and inductor's graph cache serves the copies. ``dynamic``
    is ``torch.compile``'s: by default the first batch shape compiles static and the next makes the
    sizes that changed (rows, cache length) symbolic, so later batches reuse that graph. Everything
    else runs eagerly: ``_Graphed`` runs its prefill with compiled code set aside. Returns the
    number of layers compiled.
    """
    layers = whole_blocks(model)
    if not layers:
        raise ValueError(f"model.torch_compile: {type(base_model(model)).__name__} names no decoder layer classes "
                         "(_no_split_modules), so there is nothing to compile; set model.torch_compile: false")
    for layer in layers:
        if layer._compiled_call_impl is None:  # a second predict on the same model keeps its graphs
            layer.compile(dynamic=dynamic)
    return len(layers)


# a compiled layer's graphs: up to 3 per layer (static, then symbolic rows, then symbolic cache length),
# all under one function, whose default limit is 8
_RECOMPILES = {"recompile_limit": 4096, "accumulated_recompile_limit": 1 << 16}


def _bucket(rows: int, least: int) -> int:
    """The smallest of 8, 12, 16, 24, 32, 48, ... (at least ``least``) that holds ``rows``."""
    size = 1 << max(rows - 1, 0).bit_length()  # next power of two
    if size // 4 * 3 >= rows:
        size = size // 4 * 3
    return max(least, size)


class _Dynamic:
    """Eager steps over a ``DynamicCache``; compaction selects the live rows of the cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def prefill(self, input_ids, attention_mask, n):
        self.cache = DynamicCache(config=self.model.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        if n > 1:
            self.cache.batch_repeat_interleave(n)
            logits, attention_mask, positions = (t.repeat_interleave(n, dim=0)
                                                 for t in (logits, attention_mask, positions))
        self.mask, self.next_pos = attention_mask, positions[:, -1:] + 1
        return logits

    def compact(self, keep: torch.Tensor) -> torch.Tensor | None:
        if keep.numel() == self.mask.shape[0]:
            return None
        self.cache.batch_select_indices(keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
        return keep

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        with packed_decode():
            out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                             past_key_values=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float()


class _Graphed:
    """Steps over a :class:`SlotCache` replayed from a CUDA graph (``graph=False``: run eagerly, for
    tests on CPU). Rows are dropped by moving to a smaller bucket (powers of two and 1.5 times
    them: 192 -> 128 -> 96 -> ... -> ``min_rows``), with one capture per bucket; padding slots
    repeat a live row and are ignored."""

    def __init__(self, model: torch.nn.Module, max_new_tokens: int, graph: bool, min_rows: int = 8) -> None:
        self.model, self.max_new_tokens, self.graph, self.min_rows = model, max_new_tokens, graph, min_rows

    def prefill(self, input_ids, attention_mask, n):
        rows, width = input_ids.shape
        device = input_ids.device
        dtype = next(self.model.parameters()).dtype
        self.length = width + self.max_new_tokens
        layers, heads, head_dim = _kv_layout(self.model)
        shape = (rows, heads, self.length, head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        cache = SlotCache(k, v, torch.arange(width, device=device))
        # additive masks: 0 where a query may look, the dtype's minimum elsewhere
        neg = torch.finfo(dtype).min
        allowed = attention_mask.bool()
        causal = torch.ones(width, self.length, dtype=torch.bool, device=device).tril()
        prefill_mask = allowed[:, None, None, :].expand(rows, 1, width, width)
        prefill_mask = torch.cat([prefill_mask, allowed.new_zeros(rows, 1, width, self.max_new_tokens)], dim=-1)
        prefill_mask = prefill_mask & causal | torch.eye(width, self.length, dtype=torch.bool, device=device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.compiler.set_stance("force_eager"):  # one width per batch: compiling would not pay
            out = self.model(input_ids=input_ids, attention_mask=torch.where(prefill_mask, 0.0, neg).to(dtype),
                             position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        decode_mask = torch.cat([allowed, allowed.new_zeros(rows, self.max_new_tokens)], dim=-1)
        next_pos = positions[:, -1:] + 1
        if n > 1:
            cache = cache.select(torch.arange(rows, device=device).repeat_interleave(n))
            logits, decode_mask, next_pos = (t.repeat_interleave(n, dim=0) for t in (logits, decode_mask, next_pos))
        self.neg, self.dtype = neg, dtype
        self._setup(cache, torch.where(decode_mask, 0.0, neg).to(dtype)[:, None, None, :], next_pos,
                    torch.full((1,), width, dtype=torch.long, device=device))
        return logits

    def _setup(self, cache: SlotCache, mask, next_pos, write_at) -> None:
        """Static buffers for a bucket, and the captured step."""
        self.cache = SlotCache(cache.k, cache.v, write_at)
        self.mask, self.next_pos, self.write_at = mask.contiguous(), next_pos.contiguous(), write_at
        self.token = torch.zeros((mask.shape[0], 1), dtype=torch.long, device=mask.device)
        self._graph = None
        if self.graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up, as CUDA graph capture requires
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._out = self._forward()

    def _forward(self) -> torch.Tensor:
        with packed_decode(), torch._dynamo.config.patch(**_RECOMPILES):
            out = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.next_pos,
                             past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]

    def compact(self, keep: torch.Tensor) -> torch.Tensor | None:
        rows = self.mask.shape[0]
        bucket = _bucket(int(keep.numel()), self.min_rows)
        if bucket >= rows:
            return None
        sel = torch.cat([keep, keep[-1:].expand(bucket - keep.numel())])
        self._setup(self.cache.select(sel), self.mask[sel], self.next_pos[sel], self.write_at)
        return sel

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        self.mask.index_fill_(3, self.write_at, 0.0)  # the new token sees itself
        if self._graph is not None:
            self._graph.replay()
            logits = self._out
        else:
            logits = self._forward()
        self.write_at.add_(1)
        self.next_pos.add_(1)
        return logits.float()


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
    compact_every: int = 4,
    cuda_graphs: bool | None = None,
    stop_text: Callable[[torch.Tensor], torch.Tensor] | None = None,
    synced: bool = False,
) -> Output:
    """Greedy or sampled decoding of a left-padded batch, dropping finished rows as it goes.

    Rows come out as ``generate`` orders them: prompt i's samples at ``i * n .. i * n + n - 1``.
    ``row_keys`` (one int64 per output row) seed sampling; they are required when sampling.
    ``cuda_graphs`` (default: on CUDA) replays each decode step from a CUDA graph over a static
    cache; otherwise steps run eagerly over a ``DynamicCache``. ``stop_text`` (for stop strings)
    takes the generated ids of the live rows at each compaction and says which hold a stop string;
    those rows end there and ``finish`` cuts them at the string.

    ``synced`` (ZeRO-3 on several ranks, where every forward gathers weights from all ranks): every
    rank runs the same number of forwards. Ranks agree at each compaction whether any of them still
    has live rows; a rank whose rows are done, or whose ``max_new_tokens`` is reached, runs a
    one-token forward at each step until then.
    """
    device = input_ids.device
    n = int(config.num_return_sequences or 1)
    rows = input_ids.shape[0] * n
    sample = bool(config.do_sample)
    if sample and row_keys is None:
        raise ValueError("sampling needs row_keys")
    if config.stop_strings and stop_text is None:
        raise ValueError("stop strings need stop_text")
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    total = _all_max(max_new_tokens, device) if synced else max_new_tokens
    stepper = _Graphed(model, max_new_tokens, graph=device.type == "cuda") if cuda_graphs else _Dynamic(model)
    tokens = torch.full((rows + 1, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # +1: trash row
    brace_stop = torch.full((rows + 1,), -1, dtype=torch.long, device=device)
    eos = torch.tensor(eos_token_ids or [-1], device=device)
    logits = stepper.prefill(input_ids, attention_mask, n)
    live = torch.arange(rows, device=device)  # output row of each slot (rows: a padding slot)
    if brace is not None:
        brace.reset(rows, device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    keys = row_keys.to(device) if row_keys is not None else None
    slots = 0
    idle = False  # synced: this rank's rows are all done, the other ranks' are not
    for step in range(total):
        if not idle:
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
        if step + 1 == total:
            break
        idle = idle or step + 1 == max_new_tokens  # only when synced: otherwise total == max_new_tokens
        if (step + 1) % compact_every == 0:
            keep = (~done).nonzero().squeeze(1) if not idle else done.new_zeros(0, dtype=torch.long)
            if stop_text is not None and keep.numel():
                hit = stop_text(tokens[live[keep], : step + 1])
                done[keep[hit]] = True
                keep = keep[~hit]
            if not (_any_rank(keep.numel() > 0, device) if synced else keep.numel() > 0):
                break  # the one host sync, every compact_every steps
            idle = keep.numel() == 0
            sel = None if idle else stepper.compact(keep)
            if sel is not None:
                padding = sel.numel() - keep.numel()
                live = torch.cat([live[keep], live.new_full((padding,), rows)])
                done = torch.cat([done[keep], done.new_ones(padding)])
                token = token[sel]
                if keys is not None:
                    keys = keys[sel]
                if brace is not None:
                    brace.select(sel)
        # an idle rank still joins every forward (ZeRO-3 gathers weights in each), with a one-token
        # input that needs no cache and cannot run past the model's positions
        logits = _idle_forward(model, device) if idle else stepper.step(token)
    return Output(tokens[:rows], brace_stop[:rows], slots)
