"""The compact engine gives generate's tokens, drops finished rows, and samples per row."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lgen import engine
from lgen.stopping import BraceMatchingCriteria, finish


@pytest.fixture(scope="module")
def lm(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    return model, tok


def batch(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def texts(out, tok, brace):
    return [(f.text, f.reason) for f in finish(out.tokens, tok, [tok.eos_token_id], brace, brace_stop=out.brace_stop)]


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_matches_generate_and_drops_rows(lm, graphs):
    model, tok = lm
    ids, mask = batch(tok, PROMPTS)
    config = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    brace = BraceMatchingCriteria(tok, 1, "c")
    ref = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=30,
                         stopping_criteria=[brace])
    expected = [(f.text, f.reason) for f in finish(ref[:, ids.shape[1]:], tok, [tok.eos_token_id], brace)]
    out = engine.generate(model, ids, mask, config, 30, [tok.eos_token_id], tok.pad_token_id,
                          BraceMatchingCriteria(tok, 1, "c"), compact_every=2, cuda_graphs=graphs)
    assert texts(out, tok, brace) == expected
    assert {r for _, r in expected} == {"brace_matching", "stop", "length"}
    assert out.slots < len(PROMPTS) * 30  # finished rows stopped costing slots


def test_samples_do_not_depend_on_the_batch(lm):
    model, tok = lm
    config = GenerationConfig(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, num_return_sequences=3,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    keys = torch.arange(3 * len(PROMPTS), dtype=torch.int64) * 7919

    def run(order, graphs=False):
        ids, mask = batch(tok, [PROMPTS[i] for i in order])
        k = torch.cat([keys[3 * i: 3 * i + 3] for i in order])
        out = engine.generate(model, ids, mask, config, 20, [tok.eos_token_id], tok.pad_token_id, None, k,
                              compact_every=3, cuda_graphs=graphs)
        got = [f.text for f in finish(out.tokens, tok, [tok.eos_token_id])]
        return {(i, s): got[3 * j + s] for j, i in enumerate(order) for s in range(3)}

    together = run(list(range(len(PROMPTS))))
    assert run([4]) == {k: v for k, v in together.items() if k[0] == 4}
    assert run([9, 2, 5, 0]) == {k: v for k, v in together.items() if k[0] in (9, 2, 5, 0)}
    assert run(list(range(len(PROMPTS))), graphs=True) == together
    assert len({together[(i, s)] for i in range(len(PROMPTS)) for s in range(3)}) > len(PROMPTS)  # samples differ
    other = engine.generate(model, *batch(tok, PROMPTS[:1]), config, 20, [tok.eos_token_id], tok.pad_token_id,
                            None, keys[:3] + 1)
    assert [f.text for f in finish(other.tokens, tok, [tok.eos_token_id])] != [together[(0, s)] for s in range(3)]


def test_gumbel_noise_is_a_function_of_key_step_and_token():
    a = engine.gumbel_noise(torch.tensor([1, 2, 3]), 5, 100)
    b = engine.gumbel_noise(torch.tensor([3, 1]), 5, 100)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], engine.gumbel_noise(torch.tensor([1]), 6, 100)[0])
    u = torch.exp(-torch.exp(-engine.gumbel_noise(torch.arange(200), 0, 1000)))  # back to uniforms
    assert 0.45 < u.mean() < 0.55 and u.min() > 0 and u.max() < 1


def test_unsupported_settings_are_listed():
    assert engine.unsupported(GenerationConfig(do_sample=True, top_p=0.9, temperature=0.7)) == []
    assert engine.unsupported(GenerationConfig(repetition_penalty=1.2, num_beams=2)) == ["num_beams",
                                                                                           "repetition_penalty"]


def _lockstep_worker(rank: int, folder: str, init: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    # rank 0: one batch that stops early and short; rank 1: more rows, longer
    prompts, max_new = (PROMPTS[:2], 6) if rank == 0 else (PROMPTS[2:], 30)
    ids, mask = batch(tok, prompts)
    config = GenerationConfig(do_sample=True, top_k=20, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    keys = torch.arange(len(prompts)) + 100 * rank
    run = lambda synced: texts(engine.generate(  # noqa: E731
        model, ids, mask, config, max_new, [tok.eos_token_id], tok.pad_token_id, BraceMatchingCriteria(tok, 1, "c"),
        keys, compact_every=2, cuda_graphs=False, synced=synced), tok, BraceMatchingCriteria(tok, 1, "c"))
    alone = run(False)
    calls.clear()
    together = run(True)
    # learned positions (GPT-2) filled to the last one: rank 0 has 12 prompt + 4 new tokens, rank 1
    # 2 + 14; the rank that reaches its limit first must not step past it
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    gpt2_calls = []
    gpt2.register_forward_pre_hook(lambda *_: gpt2_calls.append(1))
    width, new = (12, 4) if rank == 0 else (2, 14)
    prompt = torch.randint(3, 50, (1, width))
    greedy = GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=1)
    for graphs in (False, True):
        engine.generate(gpt2, prompt, torch.ones_like(prompt), greedy, new, [1], 0, compact_every=2,
                        cuda_graphs=graphs, synced=True)
    results[rank] = (alone == together, len(calls), len(gpt2_calls))
    torch.distributed.destroy_process_group()


def test_synced_ranks_run_the_same_number_of_forwards(tiny_model, tmp_path):
    """ZeRO-3 needs every rank in every forward: a rank that is done keeps joining with a one-token
    forward, also past its own max_new_tokens."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_lockstep_worker, args=(str(tiny_model), f"file://{tmp_path}/store", results), nprocs=2)
    (same0, calls0, gpt0), (same1, calls1, gpt1) = results[0], results[1]
    assert same0 and same1  # the records are those of an unsynced run
    assert calls0 == calls1 > 7  # rank 0 alone would stop after at most 6 forwards
    assert gpt0 == gpt1 == 2 * 14  # twice (eager, graph stepper): prefill + 13 steps, on both ranks


def test_token_budget_counts_cache_twice_prefill_activations_mask_and_row_scores(lm):
    model, _ = lm  # 2 layers, 2 KV heads of 16, hidden 64, MLP 128, float32
    assert engine.cache_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4
    per_token = 2 * 512 + (3 * 128 + 4 * 64) * 4
    assert engine.token_budget(model, free_bytes=per_token * 1000, share=1.0) == 1000
    assert engine.token_budget(model, free_bytes=per_token * 1000) == 800
    vocab = model.config.vocab_size  # rows of at least 10 tokens each carry vocabulary-wide scores
    with_rows = per_token + -(-vocab * 40 // 10)
    assert engine.token_budget(model, free_bytes=with_rows * 1000, share=1.0, row_span=10) == 1000
    with_mask = with_rows + 8 * 50  # prompts up to 50 tokens: the prefill's mask
    assert engine.token_budget(model, free_bytes=with_mask * 1000, share=1.0, row_span=10, prompt_width=50) == 1000


def test_compiled_layers_give_the_uncompiled_tokens_and_reuse_their_graphs(tiny_model):
    from torch._dynamo.utils import counters

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # its own copy: compiling changes it
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    config = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # three batches of different widths and sizes; compaction moves each through smaller buckets
    batches = [batch(tok, PROMPTS * 2), batch(tok, PROMPTS[:3]), batch(tok, PROMPTS[3:] * 3)]

    def run():
        return [engine.generate(model, ids, mask, config, 24, [tok.eos_token_id], tok.pad_token_id,
                                BraceMatchingCriteria(tok, 1, "c"), compact_every=2, cuda_graphs=True).tokens
                for ids, mask in batches]

    expected = run()
    layers = model.config.num_hidden_layers
    counters.clear()
    try:
        assert engine.compile_layers(model) == layers
        got = run()
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert [t.tolist() for t in got] == [t.tolist() for t in expected]
    # per layer: static, then the rows symbolic (a compaction), then the cache length (a wider batch);
    # 3 batches through 4 buckets reuse those, rather than compiling per batch or bucket
    assert graphs == 3 * layers, graphs
