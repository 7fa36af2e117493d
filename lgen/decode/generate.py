"""``model.generate`` as an engine: every generation setting transformers has, and prompt-learning
adapters, with lgen's stopping rules as its stopping criteria."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria

from lgen.decode.deadline import Deadline
from lgen.decode.engine import Batchwise, Generated
from lgen.decode.stopping import GenerateCriteria, StopRules
from lgen.kernels import no_cudnn_attention


class GenerateEngine(Batchwise):
    """``model.generate`` with the stopping rules as its stopping criteria (every generation
    setting; prompt-learning adapters). ``synced``: ZeRO-3 on several ranks (``synced_gpus``)."""

    def __init__(self, config: GenerationConfig, *, synced: bool = False, rules: Callable[[], StopRules] | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.config, self.synced, self.rules, self.tokenizer = config, synced, rules, tokenizer

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            max_new_tokens: int, rules: StopRules, row_keys: torch.Tensor | None,
            deadline: Deadline | None = None) -> Generated:
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
        return Generated(generated, stop_rule, stop_step, generated.numel(), dropped)


class _Expired(StoppingCriteria):
    """Ends every row of ``model.generate`` once a stop's deadline passed."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.deadline.expired(), dtype=torch.bool, device=input_ids.device)
