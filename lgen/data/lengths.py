"""Length limits: how ``block_size``, ``max_window_size`` and ``max_new_tokens`` resolve against the
tokenizer and the model, and what each implies for a row's cache.

Pure functions of the settings, so the rules can be read (and tested) without a dataset::

    block_size 512, max_new_tokens 96        -> window 416; a row of a 300-token prompt spans 396
    block_size 512, max_new_tokens auto      -> window 512; every row spans 512 (generation fills it)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

from lgen.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lengths:
    """``block``: prompt + generation cap (prompt-tuning virtual tokens taken off); ``window``: the
    most prompt tokens; ``max_new_tokens``: an integer, or ``auto`` (fill ``block``)."""

    block: int
    window: int
    max_new_tokens: int | Literal["auto"]

    def row_span(self, longest: int) -> int:
        """Cache positions a row of a prompt of ``longest`` tokens may need."""
        return self.block if self.max_new_tokens == "auto" else longest + int(self.max_new_tokens)

    def new_tokens(self, width: int) -> int:
        """``max_new_tokens`` of a batch whose longest prompt has ``width`` tokens."""
        return self.block - width if self.max_new_tokens == "auto" else int(self.max_new_tokens)


def check_new_tokens(value: int | Literal["auto"] | None) -> None:
    """A :class:`ConfigError` for a ``model.max_new_tokens`` that cannot work whatever the data."""
    if value is None:
        raise ConfigError("model.max_new_tokens must be set: an integer, or 'auto' in complete mode")
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"model.max_new_tokens must be an integer >= 1 or 'auto', got {value!r}")


@functools.cache
def _capped(model_max_length: int, max_position_embeddings: int) -> None:
    """Say once per process (a Python caller runs many jobs) that the tokenizer's limit was capped."""
    log.warning("tokenizer.model_max_length=%s exceeds the model's max_position_embeddings=%s; using block_size=%s "
                "(set data.block_size to choose)", model_max_length, max_position_embeddings,
                min(1024, max_position_embeddings))


def resolve(*, block_size: int | None, max_window_size: int | None, max_new_tokens: int | Literal["auto"] | None,
            model_max_length: int, max_position_embeddings: int | None = None, reserved_tokens: int = 0,
            has_reference: bool = False) -> Lengths:
    """The run's :class:`Lengths`, or a :class:`ConfigError` naming the key to change. Without
    ``block_size`` the tokenizer's ``model_max_length`` is the cap, unless it exceeds the model's
    positions (tokenizers often say 10^30): then 1024 or the positions, whichever is less."""
    block = block_size
    if block is None:
        block = model_max_length
        if max_position_embeddings is not None and block > max_position_embeddings:
            _capped(block, max_position_embeddings)
            block = min(1024, max_position_embeddings)
    block -= reserved_tokens
    mnt = max_new_tokens
    check_new_tokens(mnt)
    if mnt == "auto" and not has_reference:
        raise ConfigError("model.max_new_tokens: auto needs data.reference_column_name (complete mode); "
                          "without references give an integer")
    window = max_window_size
    if window is None:
        window = block if mnt == "auto" else block - mnt
    if window < 1:
        raise ConfigError(f"max_window_size={window} (block_size={block}, max_new_tokens={mnt}) leaves no room "
                          "for a prompt: raise data.block_size or lower model.max_new_tokens")
    if mnt != "auto" and window + mnt > block:  # the default window, block - mnt, always fits
        raise ConfigError(f"data.max_window_size + model.max_new_tokens = {window} + {mnt} = {window + mnt} "
                          f"exceeds data.block_size={block}; lower one of them or raise data.block_size")
    if mnt == "auto" and window > block:
        raise ConfigError(f"data.max_window_size={window} exceeds data.block_size={block}: "
                          "a prompt would not fit; lower data.max_window_size")
    return Lengths(block, window, mnt)
