"""The Python API gives lgen predict's records, and loads the model once for several jobs."""

from __future__ import annotations

import json

import pytest
from conftest import base_args, lgen, read
from transformers import AutoModelForCausalLM

from lgen.api import LLM
from lgen.errors import ConfigError

OPTIONS = {"use_brace_matching": True, "brace_matching_start_level": 1}
SAMPLED = {"do_sample": True, "temperature": 0.9, "top_k": 40, "num_return_sequences": 2}


@pytest.mark.parametrize("generation_kwargs", [None, SAMPLED], ids=["greedy", "sampled"])
def test_records_are_those_of_lgen_predict_and_the_model_loads_once(tiny_model, code_jsonl, tmp_path, monkeypatch,
                                                                     generation_kwargs):
    import datasets

    extra = ["--model.generation_kwargs", json.dumps(generation_kwargs)] if generation_kwargs else []
    assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / "cli"), *extra) == 0
    cli = sorted(read(tmp_path / "cli"), key=lambda r: (r["meta"]["row"], r["seq"]))
    loads = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: (loads.append(1), load(*a, **kw))[1])
    llm = LLM(str(tiny_model), max_new_tokens=40, generation_kwargs=generation_kwargs, trainer={"accelerator": "cpu"},
              **OPTIONS)
    rows = datasets.load_dataset("json", data_files=str(code_jsonl), split="train")
    options = {"mode": "complete", "text_column_name": "prompt", "id_column_name": "task_id",
               "keep_columns": ["lang"], "per_device_batch_size": 4}
    assert llm.generate(rows, **options) == cli
    assert llm.generate(rows, **{**options, "per_device_batch_size": 1}) == cli  # the next job: same model
    prompts = [json.loads(line)["prompt"] for line in code_jsonl.read_text().splitlines()]
    plain = llm.generate(prompts)  # ids are row numbers: samples differ (a row's stream is keyed by its id)
    assert [(r["id"], r["seq"]) for r in plain] == [(r["meta"]["row"], r["seq"]) for r in cli]
    if generation_kwargs is None:
        assert [r["prediction"] for r in plain] == [r["prediction"] for r in cli]
    assert loads == [1]


def test_an_output_dir_keeps_the_records_and_resumes(tiny_model, tmp_path):
    llm = LLM(str(tiny_model), max_new_tokens=8, trainer={"accelerator": "cpu"})
    first = llm.generate(["int f() {", "void g() {"], output_dir=tmp_path / "out")
    assert len(read(tmp_path / "out")) == 2
    assert llm.generate(["int f() {", "void g() {"], output_dir=tmp_path / "out") == first  # nothing to generate


@pytest.mark.parametrize("call,words", [
    (lambda llm: llm.generate([1, 2]), "list of strings"),
    (lambda llm: llm.generate("int f() {"), "got str"),
    (lambda llm: llm.generate(["x"], max_new_tokens=4), "['max_new_tokens'] come from the LLM"),
])
def test_bad_calls_are_named(tiny_model, call, words):
    llm = LLM(str(tiny_model), max_new_tokens=8, trainer={"accelerator": "cpu"})
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(llm)


def test_a_job_leaves_the_callers_random_state_as_it_was(tiny_model):
    """lgen seeds its own sampling; the caller's generators and PL_GLOBAL_SEED are where they were."""
    import os
    import random

    import numpy
    import torch

    llm = LLM(str(tiny_model), max_new_tokens=4, trainer={"accelerator": "cpu"},
              generation_kwargs={"do_sample": True, "top_k": 5})

    def reseed():
        random.seed(7)
        numpy.random.seed(7)
        torch.manual_seed(7)
        os.environ.pop("PL_GLOBAL_SEED", None)

    def draws():
        return random.random(), float(numpy.random.rand()), float(torch.rand(1))

    reseed()
    expected = draws()
    reseed()
    llm.generate(["int f() {"])
    assert draws() == expected
    assert "PL_GLOBAL_SEED" not in os.environ


def test_a_dataset_resumes_by_content(tiny_model, tmp_path):
    import datasets

    llm = LLM(str(tiny_model), max_new_tokens=4, trainer={"accelerator": "cpu"})
    rows = datasets.Dataset.from_dict({"task_id": ["a", "b"], "prompt": ["int f() {", "void g() {"]})
    options = {"mode": "complete", "text_column_name": "prompt", "id_column_name": "task_id"}
    first = llm.generate(rows, output_dir=tmp_path / "out", **options)
    again = datasets.Dataset.from_dict({"task_id": ["a", "b"], "prompt": ["int f() {", "void g() {"]})
    assert llm.generate(again, output_dir=tmp_path / "out", **options) == first
    assert [r["id"] for r in first] == ["a", "b"]


def test_ctrl_c_stops_a_job_as_a_keyboard_interrupt(tiny_model, tmp_path, monkeypatch):
    """The records that finished are written; the interrupt is no Exception, so ``except Exception``
    lets it through; the same call resumes."""
    import os
    import signal

    from lgen.api import JobInterrupted
    from lgen.output.writer import JsonlWriter

    llm = LLM(str(tiny_model), max_new_tokens=6, trainer={"accelerator": "cpu"})
    prompts = [f"int f{i}() {{" for i in range(6)]
    sent = []
    write = JsonlWriter.write_on_batch_end

    def write_then_interrupt(self, *args, **kwargs):
        write(self, *args, **kwargs)
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(JsonlWriter, "write_on_batch_end", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        try:
            llm.generate(prompts, output_dir=tmp_path / "out", per_device_batch_size=1)
        except Exception:  # a caller's catch-all must not swallow Ctrl-C
            pytest.fail("Ctrl-C was raised as an Exception")
    assert isinstance(caught.value, JobInterrupted) and caught.value.signum == signal.SIGINT
    assert "output_dir=" in str(caught.value)
    monkeypatch.setattr(JsonlWriter, "write_on_batch_end", write)
    assert len(llm.generate(prompts, output_dir=tmp_path / "out", per_device_batch_size=1)) == 6


def test_misspelled_options_and_empty_jobs(tiny_model):
    with pytest.raises(ConfigError, match="LLM: unknown option 'use_brace_matchin'; did you mean use_brace_matching"):
        LLM(str(tiny_model), max_new_tokens=8, use_brace_matchin=True)
    with pytest.raises(ConfigError, match="model.max_new_tokens must be an integer >= 1 or 'auto', got 0"):
        LLM(str(tiny_model), max_new_tokens=0)
    llm = LLM(str(tiny_model), max_new_tokens=8, trainer={"accelerator": "cpu"})
    with pytest.raises(ConfigError, match="LLM.generate: unknown option 'text_colum_name'; did you mean "
                                          "text_column_name"):
        llm.generate(["x"], text_colum_name="prompt")
    assert llm.generate([]) == []
