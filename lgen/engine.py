"""Engines: what turns a batch of left-padded prompts into generated tokens, under the stopping rules.

An engine answers two questions: which generation settings it cannot do (``unsupported``, asked
when the settings are read) and "run this batch with these rules" (``run``). Both return the same
:class:`Generated`: the tokens, and for each row the rule that ended it and the step.

:class:`CompactEngine` drives the decode loop itself and drops finished rows. ``model.generate``
keeps every row of a batch until the last one ends, so a batch whose rows stop after 20, 40 and
256 tokens computes 3 x 256 slots for 316 useful tokens. This loop keeps, every ``compact_every``
steps, only the rows still running, so the work shrinks as rows finish::

    step:        0 ...  8 ... 16 ... 24 ...
    live rows:   64     64    41     17  ...   (rows that stopped are gone at the next compaction)

Samples of one prompt share its prefill: the prompt runs once and its cache is repeated
``num_return_sequences`` times. Sampling draws from each row's own stream (:mod:`lgen.sampling`).

:class:`GenerateEngine` calls ``model.generate``, for the settings the compact loop lacks (beam
search, repetition penalty, ...) and prompt-learning adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria

from lgen import invariant, lockstep, sampling
from lgen.attention import decode_spans, packed_decode, packing_needed, span_decode
from lgen.data import Batch
from lgen.deadline import Deadline
from lgen.steppers import EagerStepper, GraphStepper, PoolStepper
from lgen.stopping import Finished, GenerateCriteria, StopRules, first_stops


@dataclass
class Generated:
    """``tokens``: ``[rows, steps]`` generated ids, padding after each row ended; ``stop_rule`` and
    ``stop_step``: the rule (its index in the :class:`StopRules`) that ended each row first, and the
    step (-1: none); ``slots``: row-steps computed, for the useful-slot fraction; ``dropped``: the
    rows a stop's deadline cut before they ended (None: none), which must not become records."""

    tokens: torch.Tensor
    stop_rule: torch.Tensor
    stop_step: torch.Tensor
    slots: int
    dropped: torch.Tensor | None = None


@dataclass
class Results:
    """What a ``generate`` call finished: (example, sample number from 1, the row cut where it
    ended) for each row, the row-steps computed, and the rows dropped unfinished at a stop."""

    rows: list[tuple[dict[str, Any], int, Finished]]
    slots: int
    dropped: int = 0


class Engine(Protocol):
    name: ClassVar[str]

    @staticmethod
    def unsupported(config: GenerationConfig) -> list[str]:
        """The generation settings of ``config`` this engine cannot do."""

    def generate(self, model: torch.nn.Module, batch: Batch, *, row_keys: torch.Tensor | None,
                 deadline: Deadline | None = None, emit: Callable[[list], None] | None = None) -> Results:
        """Take one batch of prompts; return the rows that finished (for the batch engines, all of
        the batch's; for continuous batching, whichever ended meanwhile). ``row_keys``: one int64
        per output row (prompt i's samples at ``i * n .. i * n + n - 1``), seeding sampling. Once
        ``deadline`` is requested, admit no prompt; once it expired, drop the rows in flight. A
        call that runs long may hand rows it finished to ``emit`` before it returns the rest."""

    def in_flight(self) -> int:
        """Rows admitted by earlier calls whose records are not out yet."""


class _Batchwise:
    """``generate`` for engines that finish a whole batch in one ``run``."""

    rules: Callable[[], StopRules]
    tokenizer: PreTrainedTokenizerBase
    synced: bool

    def in_flight(self) -> int:
        return 0  # a batch is finished within its call

    def generate(self, model: torch.nn.Module, batch: Batch, *, row_keys: torch.Tensor | None,
                 deadline: Deadline | None = None, emit: Callable[[list], None] | None = None) -> Results:
        if deadline is not None and deadline.requested and not self.synced:  # stopping: admit nothing (ranks
            return Results([], 0)  # in lockstep run the batch, to the deadline they agree on, to join its forwards)
        rules = self.rules()
        out = self.run(model, batch.input_ids, batch.attention_mask, max_new_tokens=batch.max_new_tokens,
                       rules=rules, row_keys=row_keys, deadline=deadline)
        finished = rules.finish(out.tokens, out.stop_rule, out.stop_step, self.tokenizer)
        samples = int(self.config.num_return_sequences or 1)
        dropped = [False] * len(finished) if out.dropped is None else out.dropped.tolist()
        return Results([(batch.examples[r // samples], r % samples + 1, f)
                        for r, f in enumerate(finished) if not dropped[r]], out.slots, sum(dropped))


_SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "num_return_sequences", "max_new_tokens",
              "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings"}
# settings that change what is returned or how it is computed, not which tokens come out
_NEUTRAL = {"output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
            "use_cache", "max_length", "transformers_version", "cache_implementation", "compile_config",
            "disable_compile", "is_assistant"}


@contextmanager
def decoding(device: torch.device, *, invariant_mode: bool, packed: bool, spans: bool | None) -> Iterator[None]:
    """What runs while a compact engine (or the continuous one) decodes on ``device``: the
    batch-invariant mode, or the decode attention ``packed`` and ``spans`` ask for
    (:mod:`lgen.attention`; ``spans`` None: where it runs)."""
    with (invariant.active(invariant_mode, device), packed_decode(packed),
          span_decode(decode_spans(spans, invariant_mode, device))):
        yield


class CompactEngine(_Batchwise):
    """The compact decode loop over one batch at a time (see the module docstring); the default
    is :class:`lgen.continuous.ContinuousEngine`, and this one serves ranks in lockstep (ZeRO-3).

    Args:
        config: the generation config (greedy, or temperature / top-k / top-p sampling).
        pad_token_id: what fills a row after it ended.
        compact_every: decode steps between drops of finished rows (each drop is one host sync).
        cuda_graphs: replay each decode step from a CUDA graph over a static cache (CUDA only);
            otherwise steps run eagerly over a ``DynamicCache``.
        synced: ZeRO-3 on several ranks, where every forward gathers weights from all ranks:
            every rank runs the same number of forwards. Ranks agree at each compaction whether any
            of them still has live rows; a rank whose rows are done, or whose ``max_new_tokens`` is
            reached, runs a one-token forward at each step until then.
        packed_attention: decode attention without per-head cache copies (:mod:`lgen.attention`);
            default: where this transformers needs it.
        span_attention: decode attention that reads only each row's keys (:mod:`lgen.attention`);
            default: on CUDA with Triton.
        rules, tokenizer: make a batch's stopping rules, and decode its rows (for ``generate``).
        invariant: batch-invariant decoding (:mod:`lgen.invariant`): each row computed as if alone,
            its prompt laid out from position 0 in a :class:`PoolStepper`.
    """

    name = "compact"

    def __init__(self, config: GenerationConfig, *, pad_token_id: int, compact_every: int = 4,
                 cuda_graphs: bool = False, synced: bool = False, packed_attention: bool | None = None,
                 span_attention: bool | None = None, rules: Callable[[], StopRules] | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, invariant: bool = False) -> None:
        self.rules, self.tokenizer = rules, tokenizer
        self.config, self.pad_token_id, self.compact_every = config, pad_token_id, compact_every
        self.cuda_graphs, self.synced, self.invariant = cuda_graphs, synced, invariant
        self.packed_attention = (packing_needed() if packed_attention is None else packed_attention) and not invariant
        self.span_attention = span_attention

    @staticmethod
    def unsupported(config: GenerationConfig) -> list[str]:
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

    @torch.inference_mode()
    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
            deadline: Deadline | None = None) -> Generated:
        with decoding(input_ids.device, invariant_mode=self.invariant, packed=self.packed_attention,
                      spans=self.span_attention):
            return self._run(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, rules=rules,
                             row_keys=row_keys, deadline=deadline)

    def _run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
             deadline: Deadline | None) -> Generated:
        device = input_ids.device
        samples = int(self.config.num_return_sequences or 1)
        rows = input_ids.shape[0] * samples
        if self.config.do_sample and row_keys is None:
            raise ValueError("sampling needs row_keys")
        total = lockstep.all_max(max_new_tokens, device) if self.synced else max_new_tokens
        graph = self.cuda_graphs and device.type == "cuda"
        if self.invariant:
            length = input_ids.shape[1] + max_new_tokens
            stepper = PoolStepper(model, rows=rows, length=length, graph=graph, aligned=True)
        else:
            stepper = GraphStepper(model, max_new_tokens, graph=graph) if self.cuda_graphs else EagerStepper(model)
        # output buffers, by output row (+1: a trash row that padding slots write to)
        tokens = torch.full((rows + 1, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        stop_rule = torch.full((rows + 1,), -1, dtype=torch.long, device=device)
        stop_step = torch.full((rows + 1,), -1, dtype=torch.long, device=device)
        logits = stepper.prefill(input_ids, attention_mask, samples)
        rules.start(rows, device, max_new_tokens)
        live = torch.arange(rows, device=device)  # output row of each slot (rows: a padding slot)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        keys = row_keys.to(device) if row_keys is not None else None
        slots = 0
        idle = False  # synced: this rank's rows are all done, the other ranks' are not
        for step in range(total):
            if not idle:
                token = torch.where(done, self.pad_token_id, sampling.next_tokens(logits, self.config, keys, step))
                tokens[live, step] = token
                slots += live.numel()
                ended, which = rules.advance(token)
                stop_rule[live], stop_step[live] = first_stops(stop_rule[live], stop_step[live], ended, which, step)
                done = done | ended
            if step + 1 == total:
                break
            idle = idle or step + 1 == max_new_tokens  # only when synced: otherwise total == max_new_tokens
            if (step + 1) % self.compact_every == 0:
                keep = (~done).nonzero().squeeze(1) if not idle else done.new_zeros(0, dtype=torch.long)
                if keep.numel():
                    hits = rules.scan(tokens[live[keep], : step + 1], self.compact_every)
                    if hits is not None:
                        hit = torch.tensor(hits, dtype=torch.bool, device=device)
                        done[keep[hit]] = True
                        keep = keep[~hit]
                # the one host sync, every compact_every steps; synced ranks agree on both flags
                flags = int(keep.numel() > 0) | 2 * int(deadline is not None and deadline.expired())
                flags = lockstep.all_max(flags, device) if self.synced else flags
                if flags & 2:  # a stop's deadline passed: the rows still running are dropped
                    cut = torch.zeros(rows + 1, dtype=torch.bool, device=device)
                    cut[live[keep]] = True
                    return Generated(tokens[:rows], stop_rule[:rows], stop_step[:rows], slots, cut[:rows])
                if not flags & 1:
                    break
                idle = keep.numel() == 0
                sel = None if idle else stepper.compact(keep)
                if sel is not None:
                    padding = sel.numel() - keep.numel()
                    live = torch.cat([live[keep], live.new_full((padding,), rows)])
                    done = torch.cat([done[keep], done.new_ones(padding)])
                    token = token[sel]
                    if keys is not None:
                        keys = keys[sel]
                    rules.select(sel)
            if idle:  # still join every forward (ZeRO-3 gathers weights in each)
                lockstep.idle_forward(model, device)
            else:
                logits = stepper.step(token)
        return Generated(tokens[:rows], stop_rule[:rows], stop_step[:rows], slots)


class GenerateEngine(_Batchwise):
    """``model.generate`` with the stopping rules as its stopping criteria (every generation
    setting; prompt-learning adapters). ``synced``: ZeRO-3 on several ranks (``synced_gpus``)."""

    name = "generate"

    def __init__(self, config: GenerationConfig, *, synced: bool = False, rules: Callable[[], StopRules] | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.config, self.synced, self.rules, self.tokenizer = config, synced, rules, tokenizer

    @staticmethod
    def unsupported(config: GenerationConfig) -> list[str]:
        return []

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
            deadline: Deadline | None = None) -> Generated:
        config = copy.deepcopy(self.config)
        config.max_new_tokens = max_new_tokens
        config.stop_strings = None  # the rules find them
        width = input_ids.shape[1]
        criteria = GenerateCriteria(rules, prompt_width=width, max_new_tokens=max_new_tokens)
        stops = [criteria] if deadline is None else [criteria, _Expired(deadline)]
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                stopping_criteria=stops, synced_gpus=self.synced)
        generated = output[:, width:]
        stop_rule, stop_step = rules.replay(generated, max_new_tokens)
        dropped = None
        if (deadline is not None and deadline.expired() and generated.shape[1] < max_new_tokens
                and criteria.done is not None):
            dropped = ~criteria.done  # cut by the deadline before a rule (or a stop string) ended them
        return Generated(generated, stop_rule, stop_step, generated.numel(), dropped)


class _Expired(StoppingCriteria):
    """Ends every row of ``model.generate`` once a stop's deadline passed."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.deadline.expired(), dtype=torch.bool, device=input_ids.device)
