"""DeepSpeed ZeRO-3 set up for generation rather than training.

Three DeepSpeed behaviours are meant for training:

* ``memory_efficient_linear`` (on by default) replaces ``torch.nn.functional.linear`` for the whole
  process with an autograd function that saves less for backward. Generation has no backward, and
  the replacement computes the product another way (``matmul`` with the transposed weight), which
  on a GPU need not round like ``F.linear`` in bf16. :func:`inference_config` turns it off unless
  the user set it; it must reach the config before DeepSpeed's ``zero.Init`` is entered (Lightning enters it
  around ``configure_model``), since that is where the swap happens.
* ZeRO-3 records the order in which submodules run during one forward of the wrapped module and
  prefetches and releases weights by that trace. Lightning wraps the LightningModule, so one
  "forward" is a whole ``predict_step``: hundreds of model forwards. The trace grows to tens of
  thousands of entries, every weight release scans far along it, and it goes stale whenever a batch
  runs a different number of steps, so each batch is slower than the last (docs/distributed.md).
  :func:`step_per_forward` starts a new trace at each model forward, as when DeepSpeed wraps the
  model itself.
* ZeRO-3 hooks every submodule that holds weights (each linear and norm: ~380 per forward of
  SmolLM2) and gathers and releases weights one submodule at a time. With a few rows per step that
  Python work, not the maths, sets the pace (docs/distributed.md has the figures). :func:`leaf_blocks`
  makes each transformer block one unit, gathered whole by one pair of hooks. The price is that a
  whole block's weights are on the GPU at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lgen.hf.models import base_model, whole_blocks


def is_zero3(strategy: Any) -> bool:
    """Whether ``strategy`` is DeepSpeed ZeRO stage 3 (weights gathered in forward hooks)."""
    return bool(getattr(strategy, "zero_stage_3", False))


def lockstep(strategy: Any) -> bool:
    """Whether ranks must run every forward together: ZeRO-3 on more than one rank."""
    return is_zero3(strategy) and strategy.world_size > 1


def inference_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a DeepSpeed config dict, changed in place) with ``F.linear`` left alone."""
    config.setdefault("zero_optimization", {}).setdefault("memory_efficient_linear", False)
    return config


def step_per_forward(ds_engine: Any, model: torch.nn.Module) -> RemovableHandle:
    """Make each forward of ``model`` (inside ``ds_engine``'s module) one ZeRO-3 trace step.

    A peft model's ``generate`` calls its base model's, so the hook goes on the base model, which
    every path runs. While a trace is being recorded, ``reset_step`` checks it against the other
    ranks (a collective): that is safe because lgen's ranks run the same forwards in lockstep.
    """
    coordinator = ds_engine.optimizer.get_param_coordinator()
    return base_model(model).register_forward_pre_hook(lambda *_: coordinator.reset_step())


def leaf_blocks(model: torch.nn.Module, config: dict[str, Any]) -> list[str]:
    """Make each block the model keeps whole (``_no_split_modules``, e.g. its decoder layers) one
    ZeRO-3 unit; call before DeepSpeed wraps the model. Returns the class names made units.

    Left as DeepSpeed has it: where the DeepSpeed config names its own ``leaf_module``s, where
    parameters are offloaded to NVMe (a unit is read in one go, beyond the default swap buffers),
    and for a class whose instance holds more than ``stage3_max_live_parameters``.
    """
    from deepspeed.utils import set_z3_leaf_modules

    zero = config.get("zero_optimization", {})
    if "leaf_module" in zero or (zero.get("offload_param") or {}).get("device") == "nvme":
        return []
    cap = int(zero.get("stage3_max_live_parameters", 10**9))
    size: dict[type, int] = {}
    for module in whole_blocks(model):
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        size[type(module)] = max(size.get(type(module), 0), numel)
    classes = [cls for cls, numel in size.items() if numel <= cap]
    if classes:
        set_z3_leaf_modules(base_model(model), classes)
    return sorted(c.__name__ for c in classes)
