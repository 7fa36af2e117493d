"""Models whose layers carry state of fixed size per row (linear attention, state-space and
convolution layers): the compact engine holds each row's conv and recurrent states beside its keys
and values, each row's state that of its own prompt, through admission, compaction, samples and
the batch-invariant mode. (The matrix, ``test_architectures.py``, runs every such type against
``model.generate``; here are the parts it does not reach.)"""

from __future__ import annotations

import pytest
import torch
from architectures import SCALES, VOCAB
from architectures import tiny_model as random_model
from conftest import compact, continuous, make_word_tokenizer, runs_generate_instead
from transformers import AutoTokenizer, DynamicCache, GenerationConfig

from lgen.batch import Batch, Group, left_pad
from lgen.decode import budget, cache
from lgen.decode.steppers import PoolStepper
from lgen.decode.stopping import EndOfSequence, Length, StopRules
from lgen.hf.architecture import Architecture

HYBRID, SSM = "qwen3_next", "mamba2"  # gated delta-net layers beside attention; state-space layers only
NEW = 12
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("state-words"), words=VOCAB - 4)


def prompts(count: int, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (3 + 5 * i % 23,), generator=generator).tolist() for i in range(count)]


def model_of(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return random_model(name, scale=SCALES[0]).to(dtype)


def alone(model: torch.nn.Module, tok, rows: list[list[int]]) -> list[str]:
    """``model.generate``'s text for each prompt, one at a time."""
    out = []
    for ids in rows:
        ids = torch.tensor([ids])
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=GREEDY)
        out.append(tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def rules() -> StopRules:
    return StopRules([EndOfSequence([]), Length()])


def lockstep(model, tok, rows, *, config=GREEDY, keys=None, **options) -> list[str]:
    """The compact engine's one-batch loop (ranks in lockstep use it) over ``rows`` left-padded."""
    ids, mask = left_pad(rows, 0)
    out = compact(tok, config, rules=rules(), **options).run(model, ids, mask, max_new_tokens=NEW, rules=rules(),
                                                            row_keys=keys)
    return [tok.decode(row[:NEW], skip_special_tokens=True) for row in out.tokens]


def pooled(model, tok, rows, *, group: int, pool_rows: int, config=GREEDY) -> list[str]:
    """The continuous engine over one stream of ``rows`` in groups of ``group``, in a pool of
    ``pool_rows`` rows: later groups join rows that earlier ones freed."""
    engine = continuous(tok, config, rules=rules, compact_every=2)
    got, starts = {}, list(range(0, len(rows), group))
    width = max(map(len, rows))
    for n, start in enumerate(starts):
        chunk = rows[start:start + group]
        ids, mask = left_pad(chunk, 0)
        last = n == len(starts) - 1
        g = Group(stream=0, last=last, group_rows=group, pool_rows=pool_rows, pool_length=width + NEW,
                  max_new_tokens=NEW, final=last, budget=pool_rows * (width + NEW + 3))
        batch = Batch(ids, mask, max_new_tokens=NEW, padding=False,
                      examples=[{"id": start + i} for i in range(len(chunk))], group=g)
        got.update({ex["id"]: f.text for ex, _, f in engine.generate(model, batch, row_keys=None).rows})
    return [got[i] for i in range(len(rows))]


def test_the_probe_reads_each_layers_states_as_transformers_keeps_them():
    """Shapes and dtypes of every conv and recurrent state, from the model, not the config; a
    model of state layers only keeps no keys; the memory budget counts the states per row."""
    model = model_of(HYBRID)
    ids = torch.tensor([[5, 6, 7]])
    own = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{cache.cache_argument(model): own})
    shapes = cache.states(model)
    kinds = Architecture.of(model.config, type(model)).layers
    assert [s is not None for s in shapes] == [k == "linear_attention" for k in kinds]
    for layer, shape in zip(own.layers, shapes):
        if shape is not None:
            assert shape.conv == ((tuple(layer.conv_states[0].shape[1:]), layer.conv_states[0].dtype),)
            assert shape.recurrent == ((tuple(layer.recurrent_states[0].shape[1:]), layer.recurrent_states[0].dtype),)
    ssm = model_of(SSM)
    assert not any(cache.layout(ssm)) and all(cache.states(ssm))
    per_row = sum(s.bytes for s in cache.states(ssm))
    assert budget.state_bytes_per_row(ssm) == per_row > 0
    assert budget.token_budget(ssm, 10 ** 9, prompt_width=10) < budget.token_budget(model_of("llama"), 10 ** 9,
                                                                                    prompt_width=10) * 10


@pytest.mark.parametrize("name", [HYBRID, SSM])
def test_pool_rows_that_join_and_leave_keep_their_own_state(name, tok):
    """Eleven prompts of 3 to 25 tokens through a pool of 3 rows in groups of 2 (rows join as
    others finish, the pool compacts), and through the one-batch loop: each row's tokens are
    ``model.generate``'s for its prompt alone."""
    model = model_of(name)
    rows = prompts(11)
    reference = alone(model, tok, rows)
    assert len(set(reference)) > 8
    assert pooled(model, tok, rows, group=2, pool_rows=3) == reference
    assert lockstep(model, tok, rows) == reference


def test_samples_of_a_prompt_start_from_its_state(tok):
    """Two samples per prompt, keyed: the rows of a prompt share its state after the prefill and
    then go apart; each prompt's samples are those it gets alone."""
    model = model_of(HYBRID)
    rows = prompts(5)
    config = GenerationConfig(do_sample=True, temperature=1.0, num_return_sequences=2, max_new_tokens=NEW,
                              pad_token_id=0, eos_token_id=None)
    keys = torch.arange(10, dtype=torch.int64) * 7919 + 11
    together = lockstep(model, tok, rows, config=config, keys=keys)
    assert [t for i, row in enumerate(rows) for t in
            lockstep(model, tok, [row], config=config, keys=keys[2 * i:2 * i + 2])] == together
    assert together[0] != together[1]


@pytest.mark.parametrize("name", [HYBRID, SSM])
def test_batch_invariant_rows_alone_and_together(name, tok):
    """bfloat16, batch-invariant: a row's tokens are the same bits alone, together and in another order."""
    model = model_of(name, torch.bfloat16)
    rows = prompts(8)
    together = lockstep(model, tok, rows, invariant=True)
    assert [lockstep(model, tok, [row], invariant=True)[0] for row in rows[::3]] == together[::3]
    assert lockstep(model, tok, rows[::-1], invariant=True)[::-1] == together


def test_a_prefill_writes_each_state_once_and_a_pool_step_reads_it():
    """transformers' own contract: a prefill's layer has no previous state until the prefill writes
    it (the model then runs its sequence form), a pool's always has one (its one-token form)."""
    model = model_of(HYBRID)
    pool = PoolStepper(model, rows=2, length=8, graph=False)
    assert pool.cache.has_previous_state(0) and pool.cache.get_recurrent_state(0) is not None
    fresh = cache.SlotCache(*cache.buffers(cache.layout(model), 1, 4, dtype=torch.float32, device=torch.device("cpu")),
                            torch.arange(4), conv=cache.state_buffers(cache.states(model), 1,
                                                                      device=torch.device("cpu"))[0],
                            recurrent=cache.state_buffers(cache.states(model), 1, device=torch.device("cpu"))[1])
    assert not fresh.has_previous_state(0) and fresh.get_conv_state(0) is None
    seen = fresh.update_conv_state(torch.ones((1, fresh.conv[0][0].shape[1], 2)), 0)
    assert seen.shape[-1] == fresh.conv[0][0].shape[-1]  # padded on the left to the kernel
    assert fresh.has_previous_state(0) and fresh.get_recurrent_state(0) is None  # not written yet
    fresh.update_recurrent_state(torch.ones_like(fresh.recurrent[0][0]), 0)
    assert fresh.get_recurrent_state(0).eq(1).all()


def _lockstep_worker(rank: int, folder: str, init: str, results) -> None:
    """A rank of a 2-process gloo group running the one-batch loop in lockstep over a state model:
    rank 0's prompts have four lengths, rank 1's one."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = model_of(HYBRID)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    cache.states(model)  # the probe forward, before counting
    calls.clear()
    rows = prompts(4) if rank == 0 else [prompts(1)[0]] * 3
    tok = AutoTokenizer.from_pretrained(folder)
    texts = lockstep(model, tok, rows, synced=True)
    results[rank] = (len(calls), texts == alone(model, tok, rows))
    torch.distributed.destroy_process_group()


def test_ranks_in_lockstep_run_as_many_prefill_forwards(tok, tmp_path):
    """Under ZeRO-3 every forward is a collective: a rank whose prompts have fewer lengths joins
    the other's extra prefill forwards (else both would wait forever), and each row is still
    ``model.generate``'s."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    tok.save_pretrained(tmp_path / "tok")
    mp.spawn(_lockstep_worker, args=(str(tmp_path / "tok"), f"file://{tmp_path}/store", results), nprocs=2)
    (calls0, right0), (calls1, right1) = results[0], results[1]
    assert calls0 == calls1 == 4 + NEW - 1  # four prefills, then a step for each token after the first
    assert right0 and right1


def alone_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The next-token logits after ``ids``, one forward over the whole sequence, no cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


@pytest.mark.parametrize("name", [HYBRID, SSM, "lfm2", "zaya", "jamba", "falcon_h1"])
def test_a_pool_rows_logits_are_its_own_through_a_compaction(name):
    """Logits, not only greedy text: three prompts of 4, 9 and 15 tokens prefilled into one pool,
    two steps, the middle row dropped (the pool compacts), three more steps: at every step each
    row's logits are those of its whole sequence run alone, without a cache."""
    model = model_of(name)
    rows = [prompts(4, seed=5)[i] for i in (0, 1, 3)]
    fed = [7, 9, 11, 13, 17]
    ids, mask = left_pad(rows, 0)
    with torch.inference_mode():
        pool = PoolStepper(model, rows=3, length=ids.shape[1] + len(fed), graph=False)
        logits = pool.prefill(ids, mask, 1)
        live = [0, 1, 2]
        for step, token in enumerate(fed):
            for slot, row in enumerate(live):
                want = alone_logits(model, rows[row] + fed[:step])
                torch.testing.assert_close(logits[slot], want, rtol=1e-4, atol=1e-4)
            if step == 2:
                pool.compact(torch.tensor([0, 2]))
                live = [0, 2]
            logits = pool.step(torch.full((len(live),), token))


def test_a_captured_steps_warm_up_leaves_every_state_as_it_was():
    """A CUDA graph's capture runs the step once before recording it; a state updated in place
    there would take the step's token twice. The warm-up puts every state back (on a CPU, the
    same method, without the graph)."""
    model = model_of(HYBRID)
    ids, mask = left_pad(prompts(2), 0)
    with torch.inference_mode():
        pool = PoolStepper(model, rows=2, length=ids.shape[1] + 4, graph=False)
        pool.prefill(ids, mask, 1)
        before = [s.clone() for s in pool.states()]
        assert before and any(s.abs().sum() > 0 for s in before)
        pool.token.fill_(5)
        pool._warm_up()
        assert all(torch.equal(a, b) for a, b in zip(before, pool.states()))


@pytest.mark.parametrize(("name", "because"), [
    ("minimax", "it does not run over transformers' DynamicCache (MiniMax uses cache of its own"),
    ("recurrent_gemma", "its state layers (0) keep their state themselves, not in the cache, where a pool cannot "
                        "hold each row's"),
])
def test_state_the_pool_cannot_hold_runs_generate(name, because):
    """MiniMax's layers carry state the engine could hold, but the model refuses any cache but its
    own; RecurrentGemma's config names state layers, but the model keeps their state on its
    modules (and zeroes it when the row count changes), so the probe sees none in the cache."""
    assert Architecture.of(model_of(name).config).carries_state
    runs_generate_instead(model_of(name), because)
