"""Decode attention over grouped key/value heads equals attention over the heads copied out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lgen.decode import steppers
from lgen.kernels import attention, backend

ROWS, HEADS, KV_HEADS, KEYS, DIM = 3, 8, 2, 10, 16
MODULE = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True)


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return (torch.randn(ROWS, HEADS, 1, DIM), torch.randn(ROWS, KV_HEADS, KEYS, DIM),
            torch.randn(ROWS, KV_HEADS, KEYS, DIM))


def padding_mask(additive: bool) -> torch.Tensor:
    keep = torch.ones(ROWS, 1, 1, KEYS, dtype=torch.bool)
    keep[0, ..., :4] = False  # left padding of rows 0 and 2
    keep[2, ..., :7] = False
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min) if additive else keep


@pytest.mark.parametrize("additive", [True, False])
def test_one_query_token_matches_attention_over_copied_heads(qkv, additive):
    q, k, v = qkv
    mask = padding_mask(additive)
    groups = HEADS // KV_HEADS
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=mask, scale=0.25)
    out, _ = attention.packed_sdpa(MODULE, q, k, v, mask, scaling=0.25, dropout=0.0, position_ids=None)
    assert out.shape == (ROWS, 1, HEADS, DIM)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :4], v2[0, :, :4] = 100.0, 100.0  # padded keys take no weight
    torch.testing.assert_close(attention.packed_sdpa(MODULE, q, k2, v2, mask, scaling=0.25)[0][0], out[0])


def test_anything_else_goes_to_transformers(qkv, monkeypatch):
    q, k, v = qkv
    mask = padding_mask(True)
    prefill = torch.randn(ROWS, HEADS, 4, DIM), torch.randn(ROWS, KV_HEADS, 4, DIM), torch.randn(ROWS, KV_HEADS, 4, DIM)
    cases = [  # prefill, no mask, a per-head mask
        (*prefill, None),
        (q, k, v, None),
        (q, k, v, mask.expand(ROWS, HEADS, 1, KEYS).contiguous()),
    ]
    for args in cases:
        torch.testing.assert_close(attention.packed_sdpa(MODULE, *args, scaling=0.25)[0],
                                   sdpa_attention_forward(MODULE, *args, scaling=0.25)[0])
    # an argument that changes the result (here a softcap) is left to transformers, whatever its version does with it
    seen = []
    monkeypatch.setattr(attention.sdpa_attention, "sdpa_attention_forward",
                        lambda *args, **kwargs: (seen.append(kwargs), ("transformers", None))[1])
    assert attention.packed_sdpa(MODULE, q, k, v, mask, softcap=30.0, scaling=0.25) == ("transformers", None)
    assert seen == [{"softcap": 30.0, "scaling": 0.25}]


def test_the_model_runs_under_lgen_only_within_the_block(tiny_model):
    """backend.use puts every part of the model under the ``lgen`` implementation, computing its
    own attention, and puts its implementation back after, also on an error; transformers' own
    functions are never swapped."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError, match="boom"), backend.use(model):
        assert model.config._attn_implementation == backend.NAME
        assert backend.base() is sdpa
        with attention.packed_decode(True):
            assert backend._STATE.front is not None
        assert backend._STATE.front is None
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    with backend.use(model), attention.packed_decode(False):  # where transformers packs the heads itself
        assert backend._STATE.front is None
    eager = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    with backend.use(eager):  # an eager model keeps its own eager function
        from transformers.models.llama import modeling_llama

        module = eager.model.layers[0].self_attn
        q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
        mask = torch.zeros(1, 1, 3, 3)
        ours = backend.attention(module, q, k, v, mask, scaling=0.25, dropout=0.0)[0]
        theirs = modeling_llama.eager_attention_forward(module, q, k, v, mask, scaling=0.25, dropout=0.0)[0]
        assert torch.equal(ours, theirs)
    assert eager.config._attn_implementation == "eager"


def test_engine_decode_steps_match_eager_attention(tiny_model, monkeypatch):
    """Eager attention copies the heads; the engine's packed steps must give its logits."""
    calls = []
    packed = attention.packed_sdpa
    monkeypatch.setattr(attention, "packed_sdpa", lambda *a, **kw: (calls.append(a[1].shape[2]), packed(*a, **kw))[1])
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids > 0).long()
    logits = {}
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl).eval()
        with torch.inference_mode(), backend.use(model):
            stepper = steppers.EagerStepper(model)
            stepper.prefill(ids, mask, 1)
            with attention.packed_decode(True):
                logits[impl] = torch.stack([stepper.step(torch.tensor([9, 9])) for _ in range(3)])
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)
    assert calls.count(1) == 2 * 3 * 2  # both models: 3 decode steps x 2 layers went through the packed function


def test_spans_are_each_querys_allowed_keys():
    """Spans: first and one-past-last allowed key per query, the mask as a bias (-inf where a query
    may not look), for additive and boolean masks; a query that may see nothing gets an empty span."""
    from lgen.kernels.attention import Spans

    allowed = torch.tensor([[[1, 1, 1, 0, 0], [0, 1, 0, 1, 0]], [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]], dtype=torch.bool)
    additive = torch.where(allowed, torch.tensor([0.0, -1.5, 0.0, 2.0, 0.0]), torch.finfo(torch.bfloat16).min)
    for mask in (allowed[:, None], additive.to(torch.bfloat16)[:, None]):
        bias, starts, ends = Spans()(mask, None)
        assert starts.tolist() == [[0, 1], [5, 4]] and ends.tolist() == [[3, 4], [0, 5]]
        assert starts.dtype == ends.dtype == torch.int32
        expected = torch.zeros(2, 2, 5) if mask.dtype == torch.bool else additive.to(torch.bfloat16).float()
        assert torch.equal(bias, expected.masked_fill(~allowed, float("-inf")))


def test_decoding_puts_back_what_it_swaps_also_on_an_error(tiny_model):
    """The one context that swaps attention (and turns cuDNN attention off on CUDA) leaves the
    process and the model as it found them, however the block ends."""
    from lgen.kernels import decoding, no_cudnn_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    sdpa, cudnn = ALL_ATTENTION_FUNCTIONS["sdpa"], torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError, match="boom"), no_cudnn_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        raise RuntimeError("boom")
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    for invariant in (False, True):
        with pytest.raises(RuntimeError, match="boom"), decoding(model, invariant=invariant, packed=True):
            assert backend._STATE.front is not None and model.config._attn_implementation == backend.NAME
            raise RuntimeError("boom")
        assert backend._STATE.front is None and backend._STATE.base is None
        assert model.config._attn_implementation == "sdpa" and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    with decoding(model, packed=False, spans=False):
        assert backend._STATE.front is None  # nothing asked, nothing in front of the model's own attention
