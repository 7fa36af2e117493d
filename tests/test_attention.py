"""Decode attention over grouped key/value heads equals attention over the heads copied out."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from lgen import attention


def test_one_query_token_matches_attention_over_copied_heads():
    torch.manual_seed(0)
    rows, heads, kv_heads, keys, dim = 3, 8, 2, 10, 16
    q = torch.randn(rows, heads, 1, dim)
    k, v = torch.randn(rows, kv_heads, keys, dim), torch.randn(rows, kv_heads, keys, dim)
    mask = torch.zeros(rows, 1, 1, keys)
    mask[0, ..., :4] = torch.finfo(torch.float32).min  # left padding of row 0
    mask[2, ..., :7] = torch.finfo(torch.float32).min
    copied = (k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1))
    ref = torch.nn.functional.scaled_dot_product_attention(q, *copied, attn_mask=mask, scale=0.25)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    out, _ = attention.packed_sdpa(module, q, k, v, mask, scaling=0.25)
    assert out.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    # padded keys take no weight: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :4], v2[0, :, :4] = 100.0, 100.0
    torch.testing.assert_close(attention.packed_sdpa(module, q, k2, v2, mask, scaling=0.25)[0][0], out[0])


def test_only_sdpa_models_switch_and_the_setting_comes_back(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    with attention.packed_decode(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    with attention.packed_decode(eager):
        assert eager.config._attn_implementation == "eager"


def test_decode_step_logits_unchanged(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids > 0).long()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = dict(input_ids=torch.tensor([[9], [9]]), past_key_values=out.past_key_values,
                    attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        plain = model(**step).logits
        out.past_key_values.crop(-1)
        with attention.packed_decode(model):
            packed = model(**step).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
