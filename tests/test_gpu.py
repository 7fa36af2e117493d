"""On a CUDA GPU: CUDA-graph decode steps replay exactly what the same steps compute eagerly, and a
whole run uses them. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, base_args, continuous, encode, read
from transformers import AutoModelForCausalLM, AutoTokenizer

from lgen.cli import main
from lgen.decode.steppers import PoolStepper
from lgen.kernels.attention import Spans, packed_decode, packing_needed, span_attention, span_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("spans", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_give_the_eager_logits(tiny_model, dtype, spans):
    """The same pool step, captured and replayed or run eagerly, across a compaction to a smaller
    bucket: bit for bit the same logits (SDPA, or the span attention)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    ids, mask = (t.cuda() for t in encode(tok, PROMPTS * 2))
    runs = {}
    with torch.inference_mode():
        for graph in (True, False):
            stepper = PoolStepper(model, rows=ids.shape[0], length=ids.shape[1] + 16, graph=graph)
            last = stepper.prefill(ids, mask, 1)
            logits = [last[:11]]  # rows 0..10 stay in slots 0..10 through the compaction
            with packed_decode(packing_needed()), span_decode(spans):
                for step in range(12):
                    token = last.argmax(-1)
                    if step == 5:  # 20 rows -> 11 live rows in a bucket of 12 (the last one repeated)
                        keep = torch.arange(0, 11, device="cuda")
                        sel = torch.cat([keep, keep[-1:]])
                        if graph:
                            assert torch.equal(stepper.compact(keep), sel)
                        else:  # eagerly a pool holds just the live rows: take the same 12
                            stepper.select(sel)
                        token = token[sel]
                    last = stepper.step(token).clone()
                    logits.append(last[:11])
            runs[graph] = logits
    for replayed, eager in zip(runs[True], runs[False]):
        assert torch.equal(replayed, eager)


def test_a_run_on_the_gpu_matches_generate(tiny_model, code_jsonl, tmp_path):
    """float32 on CUDA: the compact engine with CUDA graphs gives model.generate's records."""
    records = {}
    for engine in ("compact", "generate"):
        out = tmp_path / engine
        assert main(["predict", *base_args(tiny_model, code_jsonl, out), "--model.engine", engine,
                     "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                     "--trainer.enable_progress_bar", "false"]) == 0
        records[engine] = sorted((r["id"], r["prediction"], r["finish_reason"]) for r in read(out))
    assert len(records["compact"]) == len(PROMPTS) and records["compact"] == records["generate"]


@pytest.mark.parametrize("spans", [False, True])
def test_pool_graph_replays_give_the_eager_logits(tiny_model, spans):
    """Continuous batching's pool step, captured once and replayed while groups join rows that
    were left free, gives the eager step's logits bit for bit (SDPA, or the span attention)."""

    model = AutoModelForCausalLM.from_pretrained(tiny_model).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    groups = [[PROMPTS[i] for i in range(j, j + 3)] for j in (0, 3, 6)]
    runs = {}
    with torch.inference_mode():
        for graph in (True, False):
            pool = PoolStepper(model, rows=8, length=64, graph=graph)
            logits = torch.zeros(8, model.config.vocab_size, device="cuda")
            seen = []
            with packed_decode(packing_needed()), span_decode(spans):
                for step in range(15):
                    if step % 5 == 0:  # a group of 3 joins rows 0-2, 3-5, then 0-2 again (they ended)
                        slots = torch.arange(3, device="cuda") + (3 if step == 5 else 0)
                        ids, mask = (t.cuda() for t in encode(tok, groups[step // 5]))
                        logits[slots] = pool.admit(slots, ids, mask, 1)
                    logits = pool.step(logits.argmax(-1)).clone()
                    seen.append(logits)
            runs[graph] = seen
    for replayed, eager in zip(runs[True], runs[False]):
        assert torch.equal(replayed, eager)


def test_batch_invariant_rows_on_cuda(bf16_llama):
    """bf16 with CUDA graphs: a row alone, in a batch of 20, with compact_every 1, and in the
    continuous engine's pool: the same tokens."""
    from test_invariant import PROMPTS20, compact_texts, continuous_texts, load

    model, tok = load(bf16_llama, device="cuda")
    together = compact_texts(model, tok, PROMPTS20)
    assert [compact_texts(model, tok, [p])[0] for p in PROMPTS20] == together
    assert compact_texts(model, tok, PROMPTS20, every=1) == together
    assert continuous_texts(model, tok, PROMPTS20, group=3, pool_rows=7, graphs=True) == together


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_kernels_compute_the_ops_and_ignore_the_batch(dtype):
    from lgen.kernels import triton_ops as triton_kernels

    torch.manual_seed(0)
    a, w, bias = (torch.randn(300, 200, device="cuda", dtype=dtype), torch.randn(200, 96, device="cuda", dtype=dtype),
                  torch.randn(96, device="cuda", dtype=dtype))
    out = triton_kernels.matmul(a, w, bias)
    torch.testing.assert_close(out.float(), (a.double() @ w.double() + bias.double()).float(), rtol=2e-2, atol=2e-1)
    for rows in (1, 16, 64, 77, 256):  # Triton would compile other kernels for 1 and multiples of 16
        assert torch.equal(triton_kernels.matmul(a[:rows], w, bias), out[:rows]), rows
    assert torch.equal(triton_kernels.matmul(a.T.contiguous().T, w), triton_kernels.matmul(a, w))
    sums = triton_kernels.row_sum(a)
    torch.testing.assert_close(sums, a.float().sum(-1), rtol=1e-4, atol=1e-3)
    assert torch.equal(triton_kernels.row_sum(a[5:6]), sums[5:6])
    # attention: rows with 1 to 300 keys, in a cache of 333 positions, against SDPA; row 3 alone
    rows, heads, kv, dim, keys = 6, 8, 2, 64, 333
    q = torch.randn(rows, heads, 1, dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(rows, kv, keys, dim, device="cuda", dtype=dtype) for _ in range(2))
    lengths = torch.tensor([300, 1, 64, 65, 200, 128], device="cuda")
    allowed = torch.arange(keys, device="cuda")[None, None, None, :] < lengths[:, None, None, None]
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    out = span_attention(None, q, k, v, mask, spans=Spans(), scaling=0.125)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                                           v.float().repeat_interleave(4, 1), attn_mask=allowed,
                                                           scale=0.125)
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=2e-2, atol=2e-2)
    alone = span_attention(None, q[3:4], k[3:4, :, :65], v[3:4, :, :65], mask[3:4, ..., :65], spans=Spans(),
                           scaling=0.125)[0]
    assert torch.equal(alone, out[3:4])
    for row in (2, 5):  # 64 and 128 keys: Triton would compile another kernel for these lengths
        n = int(lengths[row])
        alone = span_attention(None, q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n],
                               mask[row:row + 1, ..., :n], spans=Spans(), scaling=0.125)[0]
        assert torch.equal(alone, out[row:row + 1]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 8])
def test_span_attention_honours_any_mask(dtype, dim):
    """Left padding (the plain engines' layout), a hole inside the span, a row that may see
    nothing, prefill queries with their own spans, a boolean mask: SDPA's result, where SDPA
    defines one."""
    torch.manual_seed(1)
    rows, heads, kv, queries, keys = 5, 6, 2, 3, 200
    q = torch.randn(rows, heads, queries, dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(rows, kv, keys, dim, device="cuda", dtype=dtype) for _ in range(2))
    pos = torch.arange(keys, device="cuda")
    starts = torch.tensor([0, 17, 64, 130, 5], device="cuda")[:, None, None, None]
    ends = torch.tensor([200, 90, 65, 131, 150], device="cuda")[:, None, None, None] - torch.arange(queries,
                                                                                                 device="cuda")[:, None]
    allowed = (pos >= starts) & (pos < ends)
    allowed[4, ..., 40:60] = False  # a hole
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    out = span_attention(None, q, k, v, mask, spans=Spans(), scaling=0.3)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1),
                                                           v.float().repeat_interleave(3, 1), attn_mask=allowed,
                                                           scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(span_attention(None, q, k, v, allowed, spans=Spans(), scaling=0.3)[0], out)
    narrow = span_attention(None, q, k, v, mask, spans=Spans(), scaling=0.3, block_queries=16)[0]
    torch.testing.assert_close(narrow.float(), ref, rtol=2e-2, atol=2e-2)
    nothing = torch.zeros_like(allowed[:1])
    assert torch.equal(span_attention(None, q[:1], k[:1], v[:1], nothing, spans=Spans(), scaling=0.3)[0],
                       torch.zeros_like(out[:1]))


def test_span_attention_gives_sdpa_rows_in_float32(tiny_model, monkeypatch):
    """float32 with CUDA graphs: the engines' rows with the span attention are SDPA's, and the span
    attention did run (the decode steps did not fall back to SDPA)."""
    from test_invariant import PROMPTS20, compact_texts, continuous_texts, load

    from lgen.kernels import attention

    calls = []
    monkeypatch.setattr(attention, "span_attention", lambda *a, **k: calls.append(1) or span_attention(*a, **k))
    model, tok = load(tiny_model, dtype=torch.float32, device="cuda")
    for texts in (lambda **o: compact_texts(model, tok, PROMPTS20, invariant_mode=False, **o),
                  lambda **o: continuous_texts(model, tok, PROMPTS20, group=3, pool_rows=7, graphs=True,
                                               invariant_mode=False, **o)):
        calls.clear()
        sdpa = texts(span_attention=False)
        assert not calls
        assert texts(span_attention=True) == sdpa
        assert calls  # each layer of each captured or eager decode step
        assert len(set(sdpa)) > 10

def test_pools_decoding_together_give_the_rows_of_pools_decoding_alone(bf16_llama):
    """bf16 with CUDA graphs, 3 streams: with memory for one pool (streams one after another) and
    for two (a pool drains on its CUDA stream while the next fills on its own), greedy and sampled:
    the same rows, bit for bit."""
    from test_engine import _stream_batches
    from test_invariant import PROMPTS20, load
    from transformers import GenerationConfig

    from lgen.decode.stopping import EndOfSequence, Length, StopRules

    model, tok = load(bf16_llama, device="cuda")
    for config in (GenerationConfig(do_sample=False, pad_token_id=tok.pad_token_id),
                   GenerationConfig(do_sample=True, top_p=0.9, temperature=0.8, num_return_sequences=3,
                                    pad_token_id=tok.pad_token_id)):
        samples = int(config.num_return_sequences or 1)
        runs = []
        for pools in (1, 2):
            engine = continuous(tok, config, rules=lambda: StopRules([EndOfSequence([tok.eos_token_id]), Length()]),
                                compact_every=3, cuda_graphs=True)
            got, most = {}, 0
            for batch in _stream_batches(tok, PROMPTS20, group=2, pool_rows=12, mnt=30, samples=samples, streams=3,
                                         pools=pools):
                batch.input_ids, batch.attention_mask = batch.input_ids.cuda(), batch.attention_mask.cuda()
                keys = torch.tensor([7919 * e["id"] + k for e in batch.examples for k in range(samples)], device="cuda")
                most = max(most, len([p for p in [engine.filling, *engine.draining] if p is not None]))
                got.update({(ex["id"], s): (f.text, f.reason) for ex, s, f in
                            engine.generate(model, batch, row_keys=keys).rows})
            assert most == pools
            runs.append(got)
        assert len(runs[0]) == len(PROMPTS20) * samples and runs[0] == runs[1]
