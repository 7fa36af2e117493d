"""The compact engine gives generate's tokens, drops finished rows, and samples per row."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, code_rules, compact, continuous, decoded, encode
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lgen.decode import DecodeSettings, GenerateEngine, budget, sampling
from lgen.decode import graphs as graphs_module
from lgen.decode.braces import token_table
from lgen.decode.settings import unsupported
from lgen.decode.steppers import PoolStepper
from lgen.decode.stopping import BraceMatching, EndOfSequence, GenerateCriteria, Length, StopRules, StopStrings
from lgen.errors import ConfigError


@pytest.fixture(scope="module")
def lm(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    return model, tok


def test_greedy_matches_generate_and_drops_rows(lm):
    model, tok = lm
    ids, mask = encode(tok, PROMPTS)
    config = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rules = code_rules(tok)
    ref = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=30,
                         stopping_criteria=[GenerateCriteria(rules, prompt_width=ids.shape[1], max_new_tokens=30)])
    generated = ref[:, ids.shape[1]:]
    expected = [(f.text, f.reason) for f in rules.finish(generated, *rules.replay(generated, 30), tok)]
    out = compact(tok, config, compact_every=2).run(model, ids, mask, max_new_tokens=30, rules=rules, row_keys=None)
    assert decoded(rules, out, tok) == expected
    assert {r for _, r in expected} == {"brace_matching", "stop", "length"}
    assert out.slots < len(PROMPTS) * 30  # finished rows stopped costing slots


def test_samples_do_not_depend_on_the_batch(lm):
    model, tok = lm
    config = GenerationConfig(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, num_return_sequences=3,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    keys = torch.arange(3 * len(PROMPTS), dtype=torch.int64) * 7919

    def run(order):
        ids, mask = encode(tok, [PROMPTS[i] for i in order])
        k = torch.cat([keys[3 * i: 3 * i + 3] for i in order])
        rules = code_rules(tok, brace=False)
        out = compact(tok, config, compact_every=3).run(model, ids, mask, max_new_tokens=20, rules=rules, row_keys=k)
        got = [text for text, _ in decoded(rules, out, tok)]
        return {(i, s): got[3 * j + s] for j, i in enumerate(order) for s in range(3)}

    together = run(list(range(len(PROMPTS))))
    assert run([4]) == {k: v for k, v in together.items() if k[0] == 4}
    assert run([9, 2, 5, 0]) == {k: v for k, v in together.items() if k[0] in (9, 2, 5, 0)}
    assert len({together[(i, s)] for i in range(len(PROMPTS)) for s in range(3)}) > len(PROMPTS)  # samples differ
    rules = code_rules(tok, brace=False)
    other = compact(tok, config).run(model, *encode(tok, PROMPTS[:1]), max_new_tokens=20, rules=rules,
                                     row_keys=keys[:3] + 1)
    assert [text for text, _ in decoded(rules, other, tok)] != [together[(0, s)] for s in range(3)]


def test_gumbel_noise_is_a_function_of_key_step_and_token():
    a = sampling.gumbel_noise(torch.tensor([1, 2, 3]), 5, 100)
    b = sampling.gumbel_noise(torch.tensor([3, 1]), 5, 100)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], sampling.gumbel_noise(torch.tensor([1]), 6, 100)[0])
    u = torch.exp(-torch.exp(-sampling.gumbel_noise(torch.arange(200), 0, 1000)))  # back to uniforms
    assert 0.45 < u.mean() < 0.55 and u.min() > 0 and u.max() < 1


def test_unsupported_settings_are_listed():
    assert unsupported(GenerationConfig(do_sample=True, top_p=0.9, temperature=0.7)) == []
    assert unsupported(GenerationConfig(repetition_penalty=1.2, num_beams=2)) == ["num_beams", "repetition_penalty"]


def test_decode_settings_pick_the_engine_and_refuse_what_cannot_run():
    """One place decides the engine and whether prompts join a running pool."""
    sampled = GenerationConfig(do_sample=True, top_p=0.9, num_return_sequences=3)
    chosen = DecodeSettings.choose(sampled)
    assert (chosen.engine, chosen.samples) == ("compact", 3)
    assert chosen.continuous(lockstep=False) and not chosen.continuous(lockstep=True)
    beams = DecodeSettings.choose(GenerationConfig(num_beams=2))
    assert beams.engine == "generate" and not beams.continuous(lockstep=False)
    assert DecodeSettings.choose(sampled, prompt_learning=True).engine == "generate"
    assert DecodeSettings.choose(sampled, torch_compile=True).span_attention is False
    assert not chosen.on(torch.device("cpu")).cuda_graphs
    assert chosen.on(torch.device("cuda"), sharded=False).cuda_graphs
    assert not chosen.on(torch.device("cuda"), sharded=True).cuda_graphs
    for options, words in [({"engine": "compact", "prompt_learning": True}, "prompt-learning adapters"),
                           ({"compact_every": 0}, "compact_every must be >= 1"),
                           ({"batch_invariant": True, "softcap": 30.0}, "soft-caps"),
                           ({"batch_invariant": True, "torch_compile": True}, "do not go together")]:
        with pytest.raises(ConfigError, match=words):
            DecodeSettings.choose(sampled, **options)


def _join(rank: int, folder: str, init: str):
    """A rank of a 2-process gloo group: the tiny model (its forwards counted in ``calls``) and tokenizer."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return model, tok, calls


def _lockstep_worker(rank: int, folder: str, init: str, results) -> None:
    model, tok, calls = _join(rank, folder, init)
    # rank 0: one batch that stops early and short; rank 1: more rows, longer
    prompts, max_new = (PROMPTS[:2], 6) if rank == 0 else (PROMPTS[2:], 30)
    ids, mask = encode(tok, prompts)
    config = GenerationConfig(do_sample=True, top_k=20, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    keys = torch.arange(len(prompts)) + 100 * rank

    def run(synced):
        rules = code_rules(tok)
        out = compact(tok, config, compact_every=2, synced=synced).run(model, ids, mask, max_new_tokens=max_new,
                                                                       rules=rules, row_keys=keys)
        return decoded(rules, out, tok)

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
    for invariant in (False, True):  # eager steps, and the invariant mode's pool
        rules = code_rules(SimpleNamespace(eos_token_id=1), brace=False)
        compact(SimpleNamespace(pad_token_id=0), greedy, compact_every=2, invariant=invariant, synced=True).run(
            gpt2, prompt, torch.ones_like(prompt), max_new_tokens=new, rules=rules, row_keys=None)
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
    # twice (eager, invariant pool): prefill + 13 steps, on both ranks, and the pool's one probe forward of
    # the model's cache layout (lgen.decode.cache.layout), which every rank runs together
    assert gpt0 == gpt1 == 2 * 14 + 1


def test_token_budget_shrinks_with_what_each_token_costs(tiny_model, bpe_tokenizer, tmp_path):
    """Properties, not the formula: the budget grows with free memory and with the share used, and
    shrinks with more layers, wider prompts (the prefill mask) and shorter rows (whose scores over the
    vocabulary then weigh more per token). benchmarks/scale_check.sh checks it against a real GPU."""
    from conftest import make_llama

    small = AutoModelForCausalLM.from_pretrained(tiny_model)
    deep = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "deep", bpe_tokenizer, layers=4))
    assert budget.cache_bytes_per_token(deep) == 2 * budget.cache_bytes_per_token(small)
    gib = 1 << 30
    for model in (small, deep):
        by_free = [budget.token_budget(model, free) for free in (gib, 2 * gib, 4 * gib)]
        assert by_free[0] > 0 and by_free[0] < by_free[1] < by_free[2]
        assert budget.token_budget(model, gib, share=0.5) < budget.token_budget(model, gib, share=0.8)
        assert budget.token_budget(model, gib, prompt_width=10) > budget.token_budget(model, gib, prompt_width=500)
        assert budget.token_budget(model, gib, row_span=1000) > budget.token_budget(model, gib, row_span=10)
        assert budget.token_budget(model, gib, row_span=10) < budget.token_budget(model, gib)
    assert budget.token_budget(deep, gib) < budget.token_budget(small, gib)
    assert budget.token_budget(small, 0) == 0


@pytest.mark.slow
def test_compiled_layers_give_the_uncompiled_tokens_and_reuse_their_graphs(tiny_model):
    from torch._dynamo.utils import counters

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # its own copy: compiling changes it
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    # three batches of different widths and sizes; compaction halves each
    batches = [encode(tok, PROMPTS * 2), encode(tok, PROMPTS[:3]), encode(tok, PROMPTS[3:] * 3)]

    def run():
        """Greedy tokens of each batch over a pool, halved after 6 steps (the eager pool holds just
        its live rows, so the rows change)."""
        out = []
        for ids, mask in batches:
            pool = PoolStepper(model, rows=ids.shape[0], length=ids.shape[1] + 24, graph=False)
            logits, tokens = pool.prefill(ids, mask, 1), []
            for step in range(16):
                token = logits.argmax(-1)
                if step == 6:
                    token = token[pool.compact(torch.arange(max(2, ids.shape[0] // 2)))]  # dynamo specializes 1 row
                tokens.append(token.tolist())
                logits = pool.step(token)
            out.append(tokens)
        return out

    expected = run()
    layers = model.config.num_hidden_layers
    counters.clear()
    try:
        assert graphs_module.compile_layers(model) == layers
        got = run()
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert got == expected
    # per layer: static, then the rows symbolic (a compaction), then the cache length (a wider batch);
    # 3 batches, each halved, reuse those, rather than compiling per batch or size
    assert graphs == 3 * layers, graphs


@pytest.mark.parametrize("top_k,top_p,scale", [(50, 0.9, 1.0), (20, None, 3.0), (None, 0.95, 8.0), (None, 0.95, 0.5)])
def test_candidate_draws_equal_the_vocabulary_wide_draw(top_k, top_p, scale):
    """Sampling on the few tokens top-k / top-p can keep draws exactly what the vocabulary-wide
    filter and noise draw, bf16 ties included; rows whose top-p set is wider than the candidates
    (flat logits: scale 0.5) are drawn over the vocabulary."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 5000) * scale).bfloat16().float()
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=top_k, top_p=top_p)
    keys = torch.arange(64, dtype=torch.int64) * 7919
    steps = torch.arange(64) % 7  # each row at its own step
    everywhere = (sampling.filter_logits(logits, config) + sampling.gumbel_noise(keys, steps, 5000)).argmax(-1)
    assert torch.equal(sampling.next_tokens(logits, config, keys, steps), everywhere)
    assert torch.equal(sampling.next_tokens(logits[5:9], config, keys[5:9], steps[5:9]), everywhere[5:9])


def _stream_batches(tok, prompts, *, group, pool_rows, mnt, samples=1, streams=1, pools=1):
    """Streams of groups as the data module makes them: the prompts dealt to ``streams`` streams in
    turn (no sorting), a memory budget that holds ``pools`` full pools."""
    from lgen.batch import Batch, Group

    examples = [{"id": i, "part": [1, 1], "prompt_ids": tok(p, add_special_tokens=False)["input_ids"]}
                for i, p in enumerate(prompts)]
    longest = max(len(e["prompt_ids"]) for e in examples)
    budget = pools * pool_rows * (longest + mnt + 3)  # the engines below look every 3 steps
    for s in range(streams):
        mine = examples[s::streams]
        chunks = [mine[g: g + group] for g in range(0, len(mine), group)]
        for k, chunk in enumerate(chunks):
            ids, mask = encode(tok, [prompts[e["id"]] for e in chunk])
            last = k == len(chunks) - 1
            yield Batch(ids, mask, max_new_tokens=mnt, padding=False, examples=chunk,
                        group=Group(stream=s, last=last, pool_rows=pool_rows, pool_length=longest + mnt,
                              group_rows=group * samples, max_new_tokens=mnt, final=last and s == streams - 1,
                              budget=budget))


@pytest.mark.parametrize(("stop_strings", "streams", "pools"), [(None, 1, 1), (["return"], 1, 1), (None, 3, 2)])
def test_continuous_batching_gives_each_row_what_it_gets_alone(lm, stop_strings, streams, pools):
    """A pool of 8 rows over 20 prompts (groups of 2 join as rows leave): every row's tokens, cut
    and finish reason are those of the prompt decoded alone; greedy and sampled. With 3 streams and
    memory for 2 pools, a stream's pool drains while the next one fills."""
    model, tok = lm
    prompts = PROMPTS * 2

    def rules():
        extra = [StopStrings(stop_strings, tok)] if stop_strings else []
        return StopRules([BraceMatching(token_table(tok, "c"), start_level=1), *extra,
                          EndOfSequence([tok.eos_token_id]), Length()])

    for config in (GenerationConfig(do_sample=False, pad_token_id=tok.pad_token_id),
                   GenerationConfig(do_sample=True, top_k=20, temperature=0.9, num_return_sequences=2,
                                    pad_token_id=tok.pad_token_id)):
        samples = int(config.num_return_sequences or 1)
        keys = {i: torch.tensor([1000 * i + k for k in range(samples)]) for i in range(len(prompts))}
        alone = {}
        for i, p in enumerate(prompts):
            r = rules()
            out = compact(tok, config, compact_every=3).run(model, *encode(tok, [p]), max_new_tokens=24, rules=r,
                                                             row_keys=keys[i])
            for k, (text, reason) in enumerate(decoded(r, out, tok)):
                alone[(i, k + 1)] = (text, reason)
        engine = continuous(tok, config, rules=rules, compact_every=3)
        got, calls_with_rows_in_flight, most_pools = {}, 0, 0
        for batch in _stream_batches(tok, prompts, group=2, pool_rows=8, mnt=24, samples=samples,
                                     streams=streams, pools=pools):
            busy = [pool for pool in [engine.filling, *engine.draining] if pool is not None and pool.in_flight()]
            calls_with_rows_in_flight += bool(busy)
            most_pools = max(most_pools, len(busy))
            row_keys = torch.cat([keys[e["id"]] for e in batch.examples])
            for example, sample, f in engine.generate(model, batch, row_keys=row_keys).rows:
                assert (example["id"], sample) not in got
                got[(example["id"], sample)] = (f.text, f.reason)
        assert got == alone
        assert calls_with_rows_in_flight >= 5  # groups joined a pool that was decoding
        assert most_pools == min(streams, pools)  # pools of several streams decoded together, as memory allowed
        assert engine.filling is None and not engine.draining  # all drained after the rank's last group


def test_streams_are_planned_from_the_data_alone():
    from lgen.data.plan import deal_streams, plan_streams

    lengths = [5, 9, 2, 7, 7, 1, 3, 8, 4, 6]
    streams = plan_streams(lengths, samples=1, pool_rows=4, group_size=2)
    # longest first: 1 (9), 7 (8), 3 (7), 4 (7), 9 (6), 0 (5), 8 (4), 6 (3), 2 (2), 5 (1), dealt to 3 streams
    assert streams == [[[1, 4], [8, 5]], [[7, 9], [6]], [[3, 0], [2]]]
    assert plan_streams(lengths, samples=4, pool_rows=8, group_size=2)[0] == [[1, 0]]  # 40 rows: 5 streams
    costs = [10, 30, 20, 20]  # dealt costliest first to the least loaded rank
    assert [deal_streams(costs, r, 2) for r in range(2)] == [[0, 1], [2, 3]]
    assert [deal_streams(costs, r, 3) for r in range(3)] == [[1], [0, 2], [3]]
    assert deal_streams(costs, 0, 1) == [0, 1, 2, 3]


@pytest.mark.parametrize("grace", [3600.0, 0.0])
def test_a_stop_admits_nothing_and_drops_what_the_deadline_cuts(lm, grace):
    """After a stop, the pools wind down: a long grace lets every admitted row finish, with the
    tokens it gets alone; none leaves the deadline drops them, counted. No later group joins."""
    from lgen.decode.deadline import Deadline

    model, tok = lm
    prompts = PROMPTS * 2
    config = GenerationConfig(do_sample=False, pad_token_id=tok.pad_token_id)

    def rules():
        return StopRules([BraceMatching(token_table(tok, "c"), start_level=1), EndOfSequence([tok.eos_token_id]),
                          Length()])

    alone = {}
    for i, p in enumerate(prompts):
        r = rules()
        out = compact(tok, config, compact_every=3).run(model, *encode(tok, [p]), max_new_tokens=24, rules=r,
                                                         row_keys=None)
        alone[i] = decoded(r, out, tok)[0]
    engine = continuous(tok, config, rules=rules, compact_every=3)
    deadline = Deadline(grace)
    got, admitted, dropped, in_flight = {}, set(), 0, None
    for n, batch in enumerate(_stream_batches(tok, prompts, group=2, pool_rows=8, mnt=24, samples=1, streams=1,
                                              pools=1)):
        if n == 4:
            in_flight = engine.in_flight()
            deadline.request(15)
        else:
            admitted |= {e["id"] for e in batch.examples} if not deadline.requested else set()
        out = engine.generate(model, batch, row_keys=None, deadline=deadline)
        dropped += out.dropped
        got.update({example["id"]: (f.text, f.reason) for example, _, f in out.rows})
    assert in_flight > 0 and engine.in_flight() == 0 and not engine.draining and engine.filling is None
    assert set(got) <= admitted  # nothing admitted after the stop
    assert all(got[i] == alone[i] for i in got)
    assert len(got) + dropped == len(admitted)
    assert (dropped == 0) if grace else (dropped == in_flight)


@pytest.mark.parametrize("which", ["compact", "generate"])
def test_batch_engines_drop_the_rows_a_deadline_cuts(lm, which):
    from lgen.decode.deadline import Deadline

    model, tok = lm
    ids, mask = encode(tok, PROMPTS)
    config = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    make = (lambda: compact(tok, config, compact_every=2, rules=lambda: code_rules(tok), tokenizer=tok)) \
        if which == "compact" else \
        (lambda: GenerateEngine(config, rules=lambda: code_rules(tok), tokenizer=tok))
    batch = SimpleNamespace(input_ids=ids, attention_mask=mask, max_new_tokens=30,
                            examples=[{"id": i} for i in range(len(PROMPTS))])
    whole = make().generate(model, batch, row_keys=None)
    assert len(whole.rows) == len(PROMPTS) and whole.dropped == 0
    expired = Deadline(0.0)
    expired._at = float("-inf")  # passed, but not requested at the call: the batch starts, then is cut
    cut = make().generate(model, batch, row_keys=None, deadline=expired)
    assert cut.dropped > 0 and len(cut.rows) + cut.dropped == len(PROMPTS)
    by_id = {e["id"]: f for e, _, f in whole.rows}
    assert all(f.text == by_id[e["id"]].text and f.reason == by_id[e["id"]].reason for e, _, f in cut.rows)
    stopping = Deadline(3600.0)
    stopping.request(15)
    assert make().generate(model, batch, row_keys=None, deadline=stopping).rows == []  # admits nothing


def _deadline_worker(rank: int, folder: str, init: str, results) -> None:
    from lgen.decode.deadline import Deadline

    model, tok, calls = _join(rank, folder, init)
    ids, mask = encode(tok, PROMPTS[:3] if rank == 0 else PROMPTS[3:])
    config = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    deadline = Deadline(0.0)
    if rank == 0:  # only rank 0 got the signal, and its grace is over
        deadline.request(15)
    rules = code_rules(tok, brace=False)
    out = compact(tok, config, compact_every=2, synced=True).run(model, ids, mask, max_new_tokens=40, rules=rules,
                                                                 row_keys=None, deadline=deadline)
    results[rank] = (len(calls), int(out.dropped.sum()) if out.dropped is not None else 0, ids.shape[0])
    torch.distributed.destroy_process_group()


def test_synced_ranks_agree_on_a_deadline(tiny_model, tmp_path):
    """One rank's passed deadline cuts the batch on every rank in lockstep at the same step (a rank
    that ran on alone would wait for the others' forwards forever)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_deadline_worker, args=(str(tiny_model), f"file://{tmp_path}/store", results), nprocs=2)
    (calls0, dropped0, rows0), (calls1, dropped1, rows1) = results[0], results[1]
    assert calls0 == calls1 == 2  # the prefill and one step: cut at the first look
    assert 0 < dropped0 <= rows0 and 0 < dropped1 <= rows1
