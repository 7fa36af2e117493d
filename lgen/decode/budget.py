"""How many batch tokens fit in the memory a device has left: the ``max_batch_tokens: auto`` budget."""

from __future__ import annotations

import torch

from lgen.decode import cache
from lgen.errors import UnsupportedModel
from lgen.hf import tensor_parallel


def cache_bytes_per_token(model: torch.nn.Module) -> int:
    """Key and value bytes one token takes across all layers, as the model caches them on this rank
    (:func:`lgen.decode.cache.layout`); for a model that runs over no cache but its own (only
    ``model.generate`` runs it), as its config describes its attention."""
    try:
        elements = sum(shape.elements for shape in cache.layout(model) if shape is not None)
    except UnsupportedModel:
        cfg = model.config.get_text_config(decoder=True)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elements = 2 * cfg.num_hidden_layers * heads * dim // tensor_parallel.degree(model)
    return elements * next(model.parameters()).element_size()


def state_bytes_per_row(model: torch.nn.Module) -> int:
    """Conv and recurrent state bytes one row takes across all layers, whatever its length
    (:func:`lgen.decode.cache.states`; 0 for a model the probe cannot run)."""
    try:
        return sum(shape.bytes for shape in cache.states(model) if shape is not None)
    except UnsupportedModel:
        return 0


def token_budget(model: torch.nn.Module, free_bytes: int, *, share: float = 0.8, row_span: int | None = None,
                 prompt_width: int = 0) -> int:
    """Batch tokens (prompt + new tokens, every sample) that fit in ``share`` of ``free_bytes``.

    Per token: the cache twice (a compaction copies the live rows' cache before the old one is
    freed), the prefill's widest activations (the MLP's gate, up and product, and a few hidden-size
    tensors) and its attention mask (``prompt_width`` entries of up to 8 bytes in its making). Per
    row (one sample): scores over the vocabulary (the logits, a float32 copy, and sampling's
    temporaries, ~40 bytes a token id) and the layers' states four times (the pool's, a prefill's,
    its pieces' by length, and the copy admission makes), spread over ``row_span``, the fewest
    tokens a row holds (without it, over the prompt's width).
    """
    cfg = model.config.get_text_config(decoder=True)
    elem = next(model.parameters()).element_size()
    mlp = (getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size) // tensor_parallel.degree(model)
    width = 3 * mlp + 4 * cfg.hidden_size
    per_token = 2 * cache_bytes_per_token(model) + width * elem + 8 * prompt_width
    per_row = 4 * state_bytes_per_row(model)
    if row_span:
        per_row += cfg.vocab_size * 40
    per_token += -(-per_row // (row_span or max(prompt_width, 1)))  # ceiling
    return int(free_bytes * share) // per_token
