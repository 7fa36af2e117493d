"""What a causal LM is, read from its config and its class before any weights load: whether lgen's
compact engine can run it, and whether ``model.generate`` may batch its prompts left-padded.

The compact engine decodes rows that each sit at their own place in a cache of fixed shape
(:mod:`lgen.decode.steppers`). It asks three things of a model, each read from transformers' own
description of the model, never from a list of names:

* its attention goes through transformers' attention interface and its masks through
  ``masking_utils`` (the class says so: ``is_backend_compatible()``), so that lgen computes the
  model's own attention over masks made for each row, whatever the layer types
  (:mod:`lgen.kernels.backend`);
* its forward takes ``position_ids``, so that each row gets its own positions (a model without them
  counts positions from the cache length, one number for every row);
* every cache layer holds what the engine's cache holds (the kinds transformers' ``DynamicCache``
  builds for the config): attention keys and values (full, sliding-window or chunked attention),
  and states of fixed size per row (linear-attention, state-space and convolution layers, alone
  or beside attention); indexers and compressed caches are not.

A model with no attention layer at all (Mamba) needs neither of the first two.

``model.generate`` batches prompts padded on the left; a model that counts positions from the
cache length, or whose cache is not plain attention, gets other text for a padded row than for the
same prompt alone, so its prompts go one at a time (:attr:`Architecture.padded_batches`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

ATTENTION = ("full_attention", "sliding_attention", "chunked_attention")
STATE = ("linear_attention", "conv")  # a conv and a recurrent state per row (lgen.decode.cache.StateShape)
BOTH = ("hybrid", "hybrid_sliding")  # attention and state in one layer
NO_CACHE = ("dummy",)  # a layer that keeps nothing (an MLP-only layer, one that reads another layer's cache)


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """Facts about a model class and config (see the module docstring). ``layers``: the kind of each
    cache layer (None: transformers could not say)."""

    model_type: str
    model_class: str
    backend: bool
    positions: bool
    layers: tuple[str, ...] | None

    @classmethod
    def of(cls, config: Any, model_class: type | None = None) -> Architecture:
        """The architecture ``AutoModelForCausalLM`` loads for ``config`` (or ``model_class`` with
        it, for a model already built)."""
        model_class = model_class or _causal_lm_class(config)
        takes = inspect.signature(model_class.forward).parameters if model_class is not None else {}
        backend = bool(model_class is not None and (model_class.is_backend_compatible()
                                                    or model_class._can_set_attn_implementation()))
        return cls(model_type=config.model_type, model_class=model_class.__name__ if model_class is not None else "?",
                   backend=backend, positions="position_ids" in takes, layers=_layer_kinds(config))

    def compact_missing(self) -> list[str]:
        """Why lgen's compact engine cannot run this model (empty: it can)."""
        missing = []
        if self.layers is not None and not set(self.layers) & {*ATTENTION, *BOTH}:
            return self._unknown_layers()
        if not self.backend:
            missing.append(f"{self.model_class} computes attention its own way, not through transformers' "
                           "attention interface")
        if not self.positions:
            missing.append(f"{self.model_class} takes no position_ids (it counts positions from the cache length)")
        return missing + self._unknown_layers()

    def _unknown_layers(self) -> list[str]:
        if self.layers is None:
            return ["transformers cannot say what its cache layers hold"]
        other = sorted(set(self.layers) - {*ATTENTION, *STATE, *BOTH, *NO_CACHE})
        if other:
            return [f"its cache holds {', '.join(other)} layers, not only attention keys and values and "
                    "recurrent states"]
        return []

    @property
    def carries_state(self) -> bool:
        """Whether some layer keeps a recurrent or conv state per row (:mod:`lgen.decode.cache`)."""
        return bool(self.layers and set(self.layers) & {*STATE, *BOTH})

    @property
    def padded_batches(self) -> bool:
        """Whether ``model.generate`` gives a left-padded row the text of its prompt alone."""
        return self.positions and self.layers is not None and set(self.layers) <= set(ATTENTION) | set(NO_CACHE)


def _causal_lm_class(config: Any) -> type | None:
    """The class ``AutoModelForCausalLM`` builds for ``config`` (None: none registered)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        classes = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    if not isinstance(classes, (list, tuple)):
        return classes
    named = {c.__name__: c for c in classes}
    return next((named[a] for a in (config.architectures or []) if a in named), classes[0])


def _layer_kinds(config: Any) -> tuple[str, ...] | None:
    """The kind of each cache layer, as transformers' ``DynamicCache`` reads them from the config."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    try:
        kinds, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # a config transformers' own cache cannot read: nothing is known
        return None
    return tuple(kinds)
