"""Batches to finished rows: the engines (:mod:`.engine` has the contract), their steppers and
caches, sampling, the stopping rules and what a stop's deadline means to them.

Nothing here imports Lightning, ``datasets`` or :mod:`lgen.data`: a decoder sees tensors, a
tokenizer and :class:`lgen.batch.Batch` (``tests/test_layout.py`` holds it to that).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import GenerationConfig, PreTrainedTokenizerBase

from lgen.decode.compact import CompactEngine
from lgen.decode.continuous import ContinuousEngine
from lgen.decode.engine import Engine
from lgen.decode.generate import GenerateEngine
from lgen.decode.settings import DecodeSettings
from lgen.decode.stopping import StopRules

__all__ = ["CompactEngine", "ContinuousEngine", "DecodeSettings", "Engine", "GenerateEngine", "make_engine"]


def make_engine(settings: DecodeSettings, config: GenerationConfig, *, rules: Callable[[], StopRules],
                tokenizer: PreTrainedTokenizerBase, pad_token_id: int, lockstep: bool = False) -> Engine:
    """The engine ``settings`` pick: continuous batching, the compact loop for ranks in ``lockstep``
    (ZeRO-3), or ``model.generate``."""
    if settings.engine == "generate":
        return GenerateEngine(config, synced=lockstep, rules=rules, tokenizer=tokenizer)
    if settings.continuous(lockstep=lockstep):
        return ContinuousEngine(config, settings, rules=rules, tokenizer=tokenizer, pad_token_id=pad_token_id)
    return CompactEngine(config, settings, pad_token_id=pad_token_id, synced=lockstep, rules=rules,
                         tokenizer=tokenizer)
