"""Keep float32 what transformers keeps float32 when the model runs in bf16 or fp16.

Lightning's ``bf16-true`` and ``16-true`` precisions cast the whole module, buffers included
(``module.to(dtype)`` in ``Strategy.setup``), and DeepSpeed's ``zero.Init`` turns every floating
tensor made while the model is built into its dtype. Both undo what transformers keeps in float32
inside a bf16 model, as the seed's ``from_pretrained(torch_dtype=...)`` leaves it: the rotary
position frequencies (``inv_freq``) of every RoPE model, the ``_keep_in_fp32_modules`` of some
(e.g. MoE routing biases), and the float32 adapter weights peft adds. Rounded to bf16 a rotary
frequency is off by up to 2^-9 of itself, and the rotary angle, position × frequency, by up to
0.7 rad at position 512 and 2.8 rad at 2048 (rope theta 1e5, head dim 64, as SmolLM2).

:func:`float32_tensors` copies those tensors when the model is loaded and :func:`restore_float32`
puts them back after the cast; :func:`rotary_in_float32` recomputes the rotary frequencies where
there was nothing exact to copy (``zero.Init`` computed them in bf16, or the model was loaded in
float32 and cast whole).
"""

from __future__ import annotations

import torch

from lgen.hf.models import base_model


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def float32_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the float32 parameters and buffers of a model whose other floating tensors are
    lower-precision: those transformers (or peft) keeps in float32 on purpose. Empty for a model in
    float32 throughout, where nothing is special."""
    tensors = _tensors(model)
    if all(t.dtype == torch.float32 for t in tensors.values() if t.is_floating_point()):
        return {}
    return {name: t.detach().clone() for name, t in tensors.items() if t.dtype == torch.float32}


def restore_float32(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> int:
    """Put back the tensors :func:`float32_tensors` copied, where a cast changed them; returns how
    many it restored."""
    restored = 0
    for name, current in _tensors(model).items():
        value = saved.get(name)
        if value is None or current.dtype == torch.float32:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr].data = value.to(current.device)
        else:
            owner._buffers[attr] = value.to(current.device)
        restored += 1
    return restored


def rotary_in_float32(model: torch.nn.Module) -> int:
    """Recompute in float32 the rotary frequencies that are not float32; returns how many rotary
    modules it fixed. Call outside ``zero.Init``, whose patched constructors would round them again.

    transformers' own initialiser for these buffers (``_init_weights``, which picks the module's
    rope variant) does the computing, into buffers made float32 first.
    """
    base = base_model(model)
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
