"""The compact decode loop over one batch at a time, for ranks that decode in lockstep (ZeRO-3).

``model.generate`` keeps every row of a batch until the last one ends, so a batch whose rows stop
after 20, 40 and 256 tokens computes 3 x 256 slots for 316 useful tokens. This loop keeps, every
``compact_every`` steps, only the rows still running, so the work shrinks as rows finish::

    step:        0 ...  8 ... 16 ... 24 ...
    live rows:   64     64    41     17  ...   (rows that stopped are gone at the next compaction)

Samples of one prompt share its prefill: the prompt runs once and its cache is repeated
``num_return_sequences`` times. Sampling draws from each row's own stream (:mod:`lgen.decode.sampling`).
Without ZeRO-3 the same loop runs over a pool that new prompts join (:mod:`lgen.decode.continuous`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lgen.decode import lockstep
from lgen.decode.deadline import Deadline
from lgen.decode.engine import Batchwise, Generated, next_step
from lgen.decode.settings import DecodeSettings
from lgen.decode.steppers import EagerStepper, PoolStepper, Stepper
from lgen.decode.stopping import StopRules, first_stops
from lgen.hf.architecture import Architecture
from lgen.kernels import decoding


class CompactEngine(Batchwise):
    """The compact decode loop over one batch at a time (see the module docstring).

    Args:
        config: the generation config (greedy, or temperature / top-k / top-p sampling).
        settings: the run's decode settings (``compact_every``, ``invariant``, ``samples``).
        pad_token_id: what fills a row after it ended.
        synced: ZeRO-3 on several ranks, where every forward gathers weights from all ranks:
            every rank runs the same number of forwards. Ranks agree at each compaction whether any
            of them still has live rows; a rank whose rows are done, or whose ``max_new_tokens`` is
            reached, runs a one-token forward at each step until then. (No CUDA graphs: a graph
            cannot hold ZeRO-3's weight gathers.)
        rules, tokenizer: make a batch's stopping rules, and decode its rows (for ``generate``).
    """

    def __init__(self, config: GenerationConfig, settings: DecodeSettings, *, pad_token_id: int,
                 synced: bool = False, rules: Callable[[], StopRules] | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.config, self.settings, self.pad_token_id, self.synced = config, settings, pad_token_id, synced
        self.rules, self.tokenizer = rules, tokenizer

    @torch.inference_mode()
    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
            deadline: Deadline | None = None) -> Generated:
        with decoding(model, invariant=self.settings.invariant, spans=self.settings.span_attention):
            return self._run(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, rules=rules,
                             row_keys=row_keys, deadline=deadline)

    def _run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
             deadline: Deadline | None) -> Generated:
        device = input_ids.device
        samples, every = self.settings.samples, self.settings.compact_every
        rows = input_ids.shape[0] * samples
        if self.config.do_sample and row_keys is None:
            raise ValueError("sampling needs row_keys")
        total = lockstep.all_max(max_new_tokens, device) if self.synced else max_new_tokens
        # the pool's cache for batch-invariant decoding (each prompt laid out from position 0, as if
        # alone) and for layers with recurrent state (each prompt's state its own: steppers.prefill)
        stepper: Stepper
        if self.settings.invariant or Architecture.of(model.config).carries_state:
            stepper = PoolStepper(model, rows=rows, length=input_ids.shape[1] + max_new_tokens, graph=False,
                                  aligned=self.settings.invariant, synced=self.synced)
        else:
            stepper = EagerStepper(model)
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
                token, ended, which = next_step(logits, self.config, keys, step, running=~done, rules=rules,
                                                pad_token_id=self.pad_token_id)
                tokens[live, step] = token
                slots += live.numel()
                stop_rule[live], stop_step[live] = first_stops(stop_rule[live], stop_step[live], ended, which, step)
                done = done | ended
            if step + 1 == total:
                break
            idle = idle or step + 1 == max_new_tokens  # only when synced: otherwise total == max_new_tokens
            if (step + 1) % every == 0:
                keep = (~done).nonzero().squeeze(1) if not idle else done.new_zeros(0, dtype=torch.long)
                if keep.numel():
                    hits = rules.scan(tokens[live[keep], : step + 1], every)
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
                    return Generated(tokens[:rows], stop_rule[:rows], stop_step[:rows], slots=slots,
                                     dropped=cut[:rows])
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
        return Generated(tokens[:rows], stop_rule[:rows], stop_step[:rows], slots=slots)
