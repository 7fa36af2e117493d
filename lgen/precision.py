"""Keep float32 what transformers keeps float32 when the model runs in bf16 or fp16.

Lightning's ``bf16-true`` and ``16-true`` precisions cast the whole module, buffers included
(``module.to(dtype)``), and DeepSpeed's ``zero.Init`` turns every floating tensor made while the
model is built into its dtype. Both round the rotary position frequencies (``inv_freq``), which
transformers computes and keeps in float32 even in a bf16 model (as the seed's
``from_pretrained(torch_dtype=...)`` leaves them). Rounded to bf16 a frequency is off by up to
2^-9 of itself, and the rotary angle, position × frequency, by up to 0.7 rad at position 512 and
2.8 rad at 2048 (rope theta 1e5, head dim 64, as SmolLM2): long prompts lose their positions.
"""

from __future__ import annotations

import torch


def rotary_in_float32(model: torch.nn.Module) -> int:
    """Recompute in float32 the rotary frequencies a cast or ``zero.Init`` made lower-precision;
    returns how many rotary modules it fixed. Call after Lightning has set the model up (its
    precision casts in ``Strategy.setup``) and outside ``zero.Init``, whose patched constructors
    would round them again.

    transformers' own initialiser for these buffers (``_init_weights``, which picks the module's
    rope variant) does the computing, into buffers made float32 first.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    fixed = 0
    for module in base.modules():
        freq = getattr(module, "inv_freq", None)
        if ("RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "original_inv_freq")
                or not isinstance(freq, torch.Tensor) or freq.dtype == torch.float32):
            continue
        module.inv_freq = freq.float()
        module.original_inv_freq = module.original_inv_freq.float()
        base._init_weights(module)
        fixed += 1
    return fixed
