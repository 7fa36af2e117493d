"""``model.generate`` as an engine: every generation setting transformers has, and prompt-learning
adapters, with lgen's stopping rules as its stopping criteria."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria

from lgen.decode import lockstep
from lgen.decode.deadline import Deadline
from lgen.decode.engine import Batchwise, Generated
from lgen.decode.stopping import GenerateCriteria, StopRules
from lgen.kernels import no_cudnn_attention


class GenerateEngine(Batchwise):
    """``model.generate`` with the stopping rules as its stopping criteria (every generation
    setting; prompt-learning adapters). ``synced``: ZeRO-3 on several ranks (``synced_gpus``).
    ``one_prompt``: one prompt per call, unpadded (a model that gives a left-padded row other text
    than its prompt alone, :attr:`lgen.hf.architecture.Architecture.padded_batches`)."""

    def __init__(self, config: GenerationConfig, *, synced: bool = False, rules: Callable[[], StopRules] | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, one_prompt: bool = False) -> None:
        self.config, self.synced, self.rules, self.tokenizer = config, synced, rules, tokenizer
        self.one_prompt = one_prompt

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
            deadline: Deadline | None = None) -> Generated:
        if not self.one_prompt:
            return self._run(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, rules=rules,
                             deadline=deadline)
        prompts = input_ids.shape[0]
        calls = lockstep.all_max(prompts, input_ids.device) if self.synced else prompts  # ZeRO-3: as many on every rank
        parts = []
        for i in range(calls):
            row = min(i, prompts - 1)  # a rank with fewer prompts repeats its last one, to join the others' forwards
            keep = attention_mask[row].bool()
            part = self._run(model, input_ids[row:row + 1, keep], attention_mask[row:row + 1, keep],
                             max_new_tokens=max_new_tokens, rules=self.rules(), deadline=deadline)
            if i < prompts:
                parts.append(part)
        steps = max(part.tokens.shape[1] for part in parts)
        pad = int(self.config.pad_token_id if self.config.pad_token_id is not None else 0)
        tokens = torch.cat([torch.nn.functional.pad(p.tokens, (0, steps - p.tokens.shape[1]), value=pad)
                            for p in parts])
        dropped = None
        if any(p.dropped is not None for p in parts):
            dropped = torch.cat([torch.zeros(p.tokens.shape[0], dtype=torch.bool, device=p.tokens.device)
                                 if p.dropped is None else p.dropped for p in parts])
        stop_rule, stop_step = rules.replay(tokens, max_new_tokens)
        return Generated(tokens, stop_rule, stop_step, slots=sum(p.slots for p in parts), dropped=dropped)

    def _run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             max_new_tokens: int, rules: StopRules, deadline: Deadline | None) -> Generated:
        config = copy.deepcopy(self.config)
        config.max_new_tokens = max_new_tokens
        config.stop_strings = None  # the rules find them
        width = input_ids.shape[1]
        criteria = GenerateCriteria(rules, prompt_width=width, max_new_tokens=max_new_tokens)
        stops = [criteria] if deadline is None else [criteria, _Expired(deadline)]
        with no_cudnn_attention(input_ids.device):
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                    stopping_criteria=stops, synced_gpus=self.synced)
        generated = output[:, width:]
        stop_rule, stop_step = rules.replay(generated, max_new_tokens)
        dropped = None
        if (deadline is not None and deadline.expired() and generated.shape[1] < max_new_tokens
                and criteria.done is not None):
            dropped = ~criteria.done  # cut by the deadline before a rule (or a stop string) ended them
        return Generated(generated, stop_rule, stop_step, slots=generated.numel(), dropped=dropped)


class _Expired(StoppingCriteria):
    """Ends every row of ``model.generate`` once a stop's deadline passed."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.deadline.expired(), dtype=torch.bool, device=input_ids.device)
