"""Batches to finished rows: the engines (:mod:`.engine` has the contract), their steppers and
caches, sampling, the stopping rules and what a stop's deadline means to them.

Nothing here imports Lightning, ``datasets`` or :mod:`lgen.data`: a decoder sees tensors, a
tokenizer and :class:`lgen.batch.Batch` (``tests/test_layout.py`` holds it to that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lgen.decode.compact import CompactEngine
from lgen.decode.continuous import ContinuousEngine
from lgen.decode.engine import Engine
from lgen.decode.generate import GenerateEngine
from lgen.decode.settings import DecodeSettings
from lgen.decode.steppers import pool_trouble
from lgen.decode.stopping import StopRules
from lgen.errors import UnsupportedModel
from lgen.hf.architecture import Architecture

__all__ = ["CompactEngine", "ContinuousEngine", "DecodeSettings", "Engine", "GenerateEngine", "make_engine", "settle"]


def make_engine(settings: DecodeSettings, config: GenerationConfig, *, rules: Callable[[], StopRules],
                tokenizer: PreTrainedTokenizerBase, pad_token_id: int, lockstep: bool = False) -> Engine:
    """The engine ``settings`` pick: continuous batching, the compact loop for ranks in ``lockstep``
    (ZeRO-3), or ``model.generate``."""
    if settings.engine == "generate":
        return GenerateEngine(config, synced=lockstep, rules=rules, tokenizer=tokenizer, one_prompt=settings.one_prompt)
    if settings.continuous(lockstep=lockstep):
        return ContinuousEngine(config, settings, rules=rules, tokenizer=tokenizer, pad_token_id=pad_token_id)
    return CompactEngine(config, settings, pad_token_id=pad_token_id, synced=lockstep, rules=rules,
                         tokenizer=tokenizer)


def settle(settings: DecodeSettings, model: torch.nn.Module, *, asked: str, lockstep: bool = False,
           poolable: bool = True) -> DecodeSettings:
    """The settings that run the loaded ``model``: ``settings``, unless trying it in a pool
    (:func:`lgen.decode.steppers.pool_trouble`) shows what the architecture check before loading
    could not see: the model reads the cache's length, so a pool cannot hold it and a padded
    ``model.generate`` row is not safe either. Then ``engine: auto`` (``asked``) runs
    ``model.generate`` one prompt at a time; ``engine: compact``, ``batch_invariant`` and
    ``torch_compile``, which need the compact engine, are a named error. ``poolable``: the
    architecture check found nothing missing (a ``model.generate`` run is tried only then)."""
    pooled = (settings.continuous(lockstep=lockstep) or settings.invariant
              or Architecture.of(model.config).carries_state)  # the lockstep loop pools state models too
    compact = settings.engine == "compact" and pooled
    if not (compact or (settings.engine == "generate" and poolable and not settings.one_prompt)):
        return settings
    trouble = pool_trouble(model, invariant=settings.invariant)
    if trouble is None:
        return settings
    if settings.engine == "generate":
        return dataclasses.replace(settings, one_prompt=True)
    if settings.invariant or settings.torch_compile:
        key = "batch_invariant" if settings.invariant else "torch_compile"
        raise UnsupportedModel(trouble, needs=f"model.{key} (which needs the compact engine)",
                               fix=f"set {key}: false")
    if asked != "auto":
        raise UnsupportedModel(trouble, needs="model.engine: compact")
    return dataclasses.replace(settings, engine="generate", because=(trouble,), one_prompt=True)
