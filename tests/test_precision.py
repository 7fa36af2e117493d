"""What transformers keeps in float32 inside a bf16 model survives Lightning's whole-module cast."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lgen.hf import precision


def test_float32_tensors_come_back_exactly_after_a_cast(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    # as a model's _keep_in_fp32_modules (or peft's adapters) would be: values bf16 cannot hold
    model.model.norm.weight.data = 1 + torch.arange(model.config.hidden_size, dtype=torch.float32) / 3000
    exact = {n: t.clone() for n, t in [("norm", model.model.norm.weight), ("freq", model.model.rotary_emb.inv_freq)]}
    saved = precision.float32_tensors(model)
    assert set(saved) == {"model.norm.weight", "model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    model.to(dtype=torch.bfloat16)  # what bf16-true does in Strategy.setup
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert precision.restore_float32(model, saved) == 3
    assert precision.restore_float32(model, saved) == 0  # nothing left to restore
    assert isinstance(model.model.norm.weight, torch.nn.Parameter)
    assert model.model.norm.weight.dtype == torch.float32 and torch.equal(model.model.norm.weight, exact["norm"])
    assert torch.equal(model.model.rotary_emb.inv_freq, exact["freq"])
    assert precision.rotary_in_float32(model) == 0  # already exact


def test_a_float32_model_has_nothing_special(tiny_model):
    assert precision.float32_tensors(AutoModelForCausalLM.from_pretrained(tiny_model)) == {}


def test_rotary_recomputed_when_a_float32_model_is_cast_whole(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    exact = model.model.rotary_emb.inv_freq.clone()
    model.to(dtype=torch.bfloat16)
    assert precision.rotary_in_float32(model) == 1
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, exact)
    assert torch.equal(model.model.rotary_emb.original_inv_freq, exact)
