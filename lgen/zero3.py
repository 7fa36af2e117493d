"""DeepSpeed ZeRO-3 set up for generation rather than training.

Two of DeepSpeed's defaults assume that one forward of the module it wraps is one training step:

* ``memory_efficient_linear`` (on by default) replaces ``torch.nn.functional.linear`` for the whole
  process with a matmul-based autograd function that saves less for backward. Generation has no
  backward, and the replacement picks other GPU kernels than ``F.linear``, so bf16 predictions
  drifted from the same model's plain run (2 of 12 rows on an H200). :func:`inference_config`
  turns it off unless the user set it.
* ZeRO-3 records the order in which submodules run during one forward of the wrapped module and
  prefetches and releases weights by that trace. Lightning wraps the LightningModule, so one
  "forward" is a whole ``predict_step``: hundreds of model forwards. The trace grows to tens of
  thousands of entries, every weight release scans far along it, and it goes stale whenever a batch
  runs a different number of steps (SmolLM2, 3 prompts x 48 tokens on CPU: 68 s, then 338 s for the
  next batch; with the reset below: 68 s and 65 s, on H200 the batch did not finish in 2 minutes).
  :func:`step_per_forward` starts a new trace at each model forward, as when DeepSpeed wraps the
  model itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


def inference_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a DeepSpeed config dict, changed in place) with ``F.linear`` left alone."""
    config.setdefault("zero_optimization", {}).setdefault("memory_efficient_linear", False)
    return config


def step_per_forward(ds_engine: Any, model: torch.nn.Module) -> RemovableHandle:
    """Make each forward of ``model`` (inside ``ds_engine``'s module) one ZeRO-3 trace step."""
    coordinator = ds_engine.optimizer.get_param_coordinator()
    return model.register_forward_pre_hook(lambda *_: coordinator.reset_step())
