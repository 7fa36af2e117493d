"""What lgen reads of a model before its weights load, what it finds by trying it after, and what a
run says of the engine it used (the matrix itself is ``test_architectures.py``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from architectures import VOCAB, tiny_config
from architectures import tiny_model as random_model
from conftest import base_args, lgen, make_word_tokenizer, read, runs_generate_instead
from transformers import GenerationConfig

from lgen.decode import DecodeSettings, budget, cache, settle
from lgen.decode.graphs import capturable_experts
from lgen.errors import ConfigError, UnsupportedModel
from lgen.hf.architecture import Architecture

GREEDY = GenerationConfig(do_sample=False)


def test_the_architecture_says_what_the_compact_engine_lacks():
    """Read from the config and the class alone: the reasons name the class and what it does."""
    assert Architecture.of(tiny_config("llama")).compact_missing() == []
    assert Architecture.of(tiny_config("gemma3_text")).layers == ("sliding_attention", "full_attention")
    assert Architecture.of(tiny_config("bart")).compact_missing() == [
        "BartForCausalLM takes no position_ids (it counts positions from the cache length)"]
    assert Architecture.of(tiny_config("qwen3_next")).compact_missing() == []  # recurrent states: held per row
    assert Architecture.of(tiny_config("mamba2")).compact_missing() == []  # no attention: no positions needed
    assert Architecture.of(tiny_config("deepseek_v32")).compact_missing() == [
        "its cache holds indexed_attention layers, not only attention keys and values and recurrent states"]
    assert not Architecture.of(tiny_config("qwen3_next")).padded_batches
    assert Architecture.of(tiny_config("bloom")).compact_missing()[0] == (
        "BloomForCausalLM computes attention its own way, not through transformers' attention interface")
    assert not Architecture.of(tiny_config("bart")).padded_batches
    assert Architecture.of(tiny_config("gpt_neo")).padded_batches  # left padding is safe for generate there
    settings = DecodeSettings.choose(GREEDY, architecture=Architecture.of(tiny_config("bart")))
    assert (settings.engine, settings.one_prompt) == ("generate", True)
    assert settings.because == ("BartForCausalLM takes no position_ids (it counts positions from the cache length)",)
    with pytest.raises(ConfigError, match="model.engine: compact cannot run bart models: BartForCausalLM takes no"):
        DecodeSettings.choose(GREEDY, engine="compact", architecture=Architecture.of(tiny_config("bart")))
    with pytest.raises(ConfigError, match="batch_invariant needs the compact engine.*the model needs it"):
        DecodeSettings.choose(GREEDY, batch_invariant=True, architecture=Architecture.of(tiny_config("bart")))


def test_the_cache_takes_the_shapes_the_model_writes():
    """One probe forward per model: per-layer head sizes (Gemma 4's global layers), a latent cache
    (DeepSeek's multi-head latent attention), layers that keep nothing (shared key/value layers),
    and the window transformers' cache keeps; the memory budget counts what is cached."""
    gemma4 = cache.layout(random_model("gemma4_text"))
    assert [(s.key_heads, s.key_dim, s.window) for s in gemma4] == [(2, 16, 8), (2, 32, None)]
    shared = cache.layout(random_model("gemma4_text+kv_sharing"))
    assert shared[2:] == (None, None)
    model = random_model("deepseek_v3")
    latent = cache.layout(model)
    per_token = sum(s.elements for s in latent) * 4
    assert budget.cache_bytes_per_token(model) == per_token
    heads, dim = model.config.num_attention_heads, model.config.qk_nope_head_dim + model.config.qk_rope_head_dim
    assert per_token < 2 * 2 * heads * dim * 4  # less than every head's keys and values
    assert cache.windows(gemma4) == {0: 8}


def test_a_model_that_reads_the_cache_length_runs_generate_or_is_refused():
    """GIT widens its mask by what the cache length says: only trying it in a pool shows it. Then
    engine auto runs model.generate one prompt at a time; engine compact, batch_invariant and
    torch_compile are refused by name; engine generate takes one prompt at a time too."""
    model = random_model("git", scale=0.3)
    runs_generate_instead(model, "it uses the cache's length while decoding, and the rows of a pool are each at a "
                                 "length of their own")
    with pytest.raises(UnsupportedModel, match=r"model.batch_invariant \(which needs the compact engine\) cannot run "
                                               r".*; set batch_invariant: false"):
        settle(DecodeSettings.choose(GREEDY, batch_invariant=True), model, asked="auto")
    generate = settle(DecodeSettings.choose(GREEDY, engine="generate"), model, asked="generate")
    assert generate.one_prompt
    llama = random_model("llama")
    assert settle(DecodeSettings.choose(GREEDY), llama, asked="auto") == DecodeSettings.choose(GREEDY)


def test_the_invariant_mode_refuses_attention_it_does_not_compute():
    """gpt-oss's attention has sinks: batch_invariant is refused by name before any prompt."""
    model = random_model("gpt_oss", scale=0.3)
    with pytest.raises(UnsupportedModel, match="model.batch_invariant cannot run this model: its attention has "
                                               "attention sinks.*set batch_invariant: false"):
        settle(DecodeSettings.choose(GREEDY, batch_invariant=True), model, asked="auto")


def test_experts_run_an_implementation_a_graph_holds():
    """In a CUDA-graph step, experts run without reading anything on the host: grouped_mm in bf16,
    batched_mm otherwise; the model's own implementation comes back after."""
    model = random_model("mixtral")
    own = model.get_experts_implementation()
    with capturable_experts(model):
        assert model.get_experts_implementation() == {"": "batched_mm"}
    assert model.get_experts_implementation() == own
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="boom"), capturable_experts(model):
        assert model.get_experts_implementation() == {"": "grouped_mm"}
        raise RuntimeError("boom")
    assert model.get_experts_implementation() == own
    dense = random_model("llama")
    with capturable_experts(dense):  # nothing to switch
        pass


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """A tiny BART decoder (positions from the cache length) saved with a word tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bart")
    tok = make_word_tokenizer(folder, words=VOCAB - 4)
    model = random_model("bart", scale=0.3)
    model.config.update({"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                         "eos_token_id": tok.eos_token_id})
    model.save_pretrained(folder)
    GenerationConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(folder)
    return folder


def test_a_run_says_which_engine_it_used_and_why(bart, code_jsonl, tmp_path, capsys):
    """engine auto on a model the compact engine lacks: one line says so, summary.json too, and the
    records are those of the prompts one at a time; engine compact is a one-line error, exit 2."""
    out = tmp_path / "auto"
    assert lgen(*base_args(bart, code_jsonl, out)) == 0
    why = "BartForCausalLM takes no position_ids (it counts positions from the cache length)"
    said = [line for line in capsys.readouterr().err.splitlines() if "engine: auto" in line]
    assert said == [f"lgen: warning: engine: auto runs model.generate for this bart model, as {why}, one prompt at a "
                    "time"]
    run = json.loads((out / "summary.json").read_text())["runs"][-1]
    assert {k: run[k] for k in ("engine", "engine_reason", "one_prompt_at_a_time")} == {
        "engine": "generate", "engine_reason": why, "one_prompt_at_a_time": True}
    alone = tmp_path / "alone"
    assert lgen(*base_args(bart, code_jsonl, alone, "--data.per_device_batch_size", "1")) == 0
    assert sorted(map(json.dumps, read(out))) == sorted(map(json.dumps, read(alone)))
    capsys.readouterr()
    assert lgen(*base_args(bart, code_jsonl, tmp_path / "compact", "--model.engine", "compact")) == 2
    assert capsys.readouterr().err.strip() == (f"lgen: error: model.engine: compact cannot run bart models: {why}; "
                                               "use engine: generate or auto")


def test_a_compact_run_says_so(tiny_model, code_jsonl, tmp_path):
    out = tmp_path / "out"
    assert lgen(*base_args(tiny_model, code_jsonl, out)) == 0
    run = json.loads((out / "summary.json").read_text())["runs"][-1]
    assert run["engine"] == "compact" and "engine_reason" not in run


def test_the_invariant_mode_runs_latent_attention():
    """Multi-head latent attention's values are smaller than its keys (DeepSeek V3): the
    batch-invariant attention computes them (it failed on their shape), each row as alone, in bf16."""
    from conftest import compact

    from lgen.batch import left_pad
    from lgen.decode.stopping import EndOfSequence, Length, StopRules

    model = random_model("deepseek_v3", scale=0.3).to(torch.bfloat16)
    assert model.config.v_head_dim != model.config.qk_nope_head_dim + model.config.qk_rope_head_dim
    config = GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=None)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]]

    def run(prompts):
        ids, mask = left_pad(prompts, 0)
        out = compact(SimpleNamespace(pad_token_id=0), config, invariant=True).run(
            model, ids, mask, max_new_tokens=8, rules=StopRules([EndOfSequence([]), Length()]), row_keys=None)
        return [row[:8].tolist() for row in out.tokens]

    together = run(rows)
    assert together == [run([row])[0] for row in rows] and len({tuple(t) for t in together}) == 3
