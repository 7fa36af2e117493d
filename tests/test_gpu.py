"""On a CUDA GPU: CUDA-graph decode steps replay exactly what the same steps compute eagerly, and a
whole run uses them. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, base_args, encode, read
from transformers import AutoModelForCausalLM, AutoTokenizer

from lgen.attention import packed_decode, packing_needed
from lgen.cli import main
from lgen.steppers import GraphStepper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_give_the_eager_logits(tiny_model, dtype):
    """The same static-cache step, captured and replayed or run eagerly, across a compaction to a
    smaller bucket: bit for bit the same logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    ids, mask = (t.cuda() for t in encode(tok, PROMPTS * 2))
    runs = {}
    with torch.inference_mode():
        for graph in (True, False):
            stepper = GraphStepper(model, 16, graph=graph)
            logits = [stepper.prefill(ids, mask, 1)]
            with packed_decode(packing_needed()):
                for step in range(12):
                    token = logits[-1].argmax(-1)
                    if step == 5:  # 20 rows -> 11 live rows in a bucket of 12
                        token = token[stepper.compact(torch.arange(0, 11, device="cuda"))]
                    logits.append(stepper.step(token).clone())
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


def test_pool_graph_replays_give_the_eager_logits(tiny_model):
    """Continuous batching's pool step, captured once and replayed while groups join rows that
    were left free, gives the eager step's logits bit for bit."""
    from lgen.steppers import PoolStepper

    model = AutoModelForCausalLM.from_pretrained(tiny_model).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    groups = [[PROMPTS[i] for i in range(j, j + 3)] for j in (0, 3, 6)]
    runs = {}
    with torch.inference_mode():
        for graph in (True, False):
            pool = PoolStepper(model, rows=8, length=64, graph=graph)
            logits = torch.zeros(8, model.config.vocab_size, device="cuda")
            seen = []
            with packed_decode(packing_needed()):
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
    together = compact_texts(model, tok, PROMPTS20, graphs=True)
    assert [compact_texts(model, tok, [p], graphs=True)[0] for p in PROMPTS20] == together
    assert compact_texts(model, tok, PROMPTS20, every=1, graphs=True) == together
    assert compact_texts(model, tok, PROMPTS20, every=1, graphs=False) == together
    assert continuous_texts(model, tok, PROMPTS20, group=3, pool_rows=7, graphs=True) == together


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_kernels_compute_the_ops_and_ignore_the_batch(dtype):
    from lgen import invariant, invariant_triton

    torch.manual_seed(0)
    a, w, bias = (torch.randn(300, 200, device="cuda", dtype=dtype), torch.randn(200, 96, device="cuda", dtype=dtype),
                  torch.randn(96, device="cuda", dtype=dtype))
    out = invariant_triton.matmul(a, w, bias)
    torch.testing.assert_close(out.float(), (a.double() @ w.double() + bias.double()).float(), rtol=2e-2, atol=2e-1)
    for rows in (1, 16, 64, 77, 256):  # Triton would compile other kernels for 1 and multiples of 16
        assert torch.equal(invariant_triton.matmul(a[:rows], w, bias), out[:rows]), rows
    assert torch.equal(invariant_triton.matmul(a.T.contiguous().T, w), invariant_triton.matmul(a, w))
    sums = invariant_triton.row_sum(a)
    torch.testing.assert_close(sums, a.float().sum(-1), rtol=1e-4, atol=1e-3)
    assert torch.equal(invariant_triton.row_sum(a[5:6]), sums[5:6])
    # attention: rows with 1 to 300 keys, in a cache of 333 positions, against SDPA; row 3 alone
    rows, heads, kv, dim, keys = 6, 8, 2, 64, 333
    q = torch.randn(rows, heads, 1, dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(rows, kv, keys, dim, device="cuda", dtype=dtype) for _ in range(2))
    lengths = torch.tensor([300, 1, 64, 65, 200, 128], device="cuda")
    allowed = torch.arange(keys, device="cuda")[None, None, None, :] < lengths[:, None, None, None]
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    ends = invariant._Ends()
    out = invariant.triton_attention(None, q, k, v, mask, ends=ends, scaling=0.125)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                                           v.float().repeat_interleave(4, 1), attn_mask=allowed,
                                                           scale=0.125)
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=2e-2, atol=2e-2)
    alone = invariant.triton_attention(None, q[3:4], k[3:4, :, :65], v[3:4, :, :65], mask[3:4, ..., :65],
                                       ends=invariant._Ends(), scaling=0.125)[0]
    assert torch.equal(alone, out[3:4])
    for row in (2, 5):  # 64 and 128 keys: Triton would compile another kernel for these lengths
        n = int(lengths[row])
        alone = invariant.triton_attention(None, q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n],
                                           mask[row:row + 1, ..., :n], ends=invariant._Ends(), scaling=0.125)[0]
        assert torch.equal(alone, out[row:row + 1]), n
