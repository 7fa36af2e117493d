"""Every option either changes ``fingerprint.json`` (a resume with another value is refused) or is
declared not to change a record (``RECORD_NEUTRAL``); a new option fails here until it is one or the other."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from conftest import TEMPLATE, code_jsonl  # noqa: F401  (fixture)

from lgen.data import GenerationDataModule
from lgen.module import GenerationModule
from lgen.predict import LINKED, RECORD_NEUTRAL, TRAINER_KEYS, make_fingerprint


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("fp")
    (d / "a.jsonl").write_text("".join(json.dumps({"task_id": f"t/{i}", "prompt": f"int f{i}() {{", "lang": "c"})
                                       + "\n" for i in range(3)))
    (d / "b.jsonl").write_text(json.dumps({"task_id": "t/0", "prompt": "int g() {", "lang": "c"}) + "\n")
    (d / "chat.jinja").write_text(TEMPLATE)
    (d / "gen.json").write_text(json.dumps({"do_sample": True, "top_k": 5}))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, d / "copy")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(d / "lora")
    return d


# option -> (its other value, settings both fingerprints share)
def alternatives(model: Path, d: Path) -> dict[str, tuple]:
    chat = {"data.chat_template": str(d / "chat.jinja"), "data.mode": "complete"}
    return {
        "model.model_name_or_path": (str(d / "copy"), {}),  # the same model by another name: another model
        "model.max_new_tokens": (9, {}),
        "model.config_name": (str(model), {}),
        "model.tokenizer_name": (str(model), {}),
        "model.use_fast_tokenizer": (False, {}),
        "model.model_revision": ("v2", {}),
        "model.token": ("hf_x", {}),
        "model.adapter_name_or_path": (str(d / "lora"), {}),
        "model.merge_adapter": (False, {}),
        "model.torch_dtype": ("bfloat16", {}),
        "model.generation_config_file": (str(d / "gen.json"), {}),
        "model.generation_kwargs": ({"do_sample": True, "temperature": 0.5}, {}),
        "model.use_brace_matching": (True, {}),
        "model.brace_matching_start_level": (1, {}),
        "model.brace_matching_language": ("python", {}),
        "model.stop_strings": (["\n\n"], {}),
        "model.keep_stop_string": (True, {}),
        "model.engine": ("generate", {}),
        "model.compact_every": (2, {}),
        "model.cuda_graphs": (False, {}),
        "model.torch_compile": (True, {}),
        "model.batch_invariant": (True, {}),
        "seed_everything": (7, {}),
        "data.dataset_name": ("json", {}),
        "data.data_files": (str(d / "b.jsonl"), {}),
        "data.dataset_config_name": ("x", {}),
        "data.dataset_split": ("validation", {}),
        "data.dataset_revision": ("r1", {}),
        "data.text_column_name": ("prompt", {}),
        "data.reference_column_name": ("lang", {"data.mode": "complete"}),
        "data.id_column_name": ("task_id", {}),
        "data.keep_columns": (["lang"], {}),
        "data.streaming": (True, {}),
        "data.overwrite_cache": (True, {}),
        "data.preprocessing_num_workers": (2, {}),
        "data.per_device_batch_size": (2, {}),
        "data.max_batch_tokens": (4096, {}),
        "data.block_size": (128, {}),
        "data.max_window_size": (20, {}),
        "data.subsamples": (2, {"data.mode": "strided"}),
        "data.sort_by_length": (False, {}),
        "data.sample_by": ("paragraph", {}),
        "data.chat_template": (str(d / "chat.jinja"), {"data.mode": "complete"}),
        "data.system_prompt": ("Be brief.", chat),
        "data.mode": ("strided", {}),
    }


def fingerprint(model: Path, d: Path, options: dict) -> dict:
    kw = {"model": {"model_name_or_path": str(model), "max_new_tokens": 8, "token": None, "seed": 0},
          "data": {"data_files": str(d / "a.jsonl")}}
    for key, value in options.items():
        group, name = key.split(".") if key != "seed_everything" else ("model", "seed")
        kw[group][name] = value
    kw["data"].update(max_new_tokens=kw["model"]["max_new_tokens"], token=kw["model"]["token"],
                      seed=kw["model"]["seed"])  # the links
    module = GenerationModule(**kw["model"])
    data = GenerationDataModule(**kw["data"])
    data.connect(module.tokenizer, max_position_embeddings=256, samples=module.num_return_sequences)
    return make_fingerprint(module, data, precision="32-true")


def test_every_option_is_fingerprinted_or_declared_neutral(tiny_model, files):
    table = alternatives(tiny_model, files)
    options = {f"model.{n}" for n in inspect.signature(GenerationModule.__init__).parameters if n != "self"}
    options |= {f"data.{n}" for n in inspect.signature(GenerationDataModule.__init__).parameters if n != "self"}
    options -= LINKED  # set only through links, from a key that is tested here
    assert options | {"seed_everything"} == set(table), f"options without an entry here: {sorted(options - set(table))}"
    changed, same = [], []
    for key, (value, shared) in table.items():
        base = fingerprint(tiny_model, files, shared)
        other = fingerprint(tiny_model, files, {**shared, key: value})
        (changed if other != base else same).append(key)
    neutral = {k for k in RECORD_NEUTRAL if not k.startswith("trainer.")}
    assert sorted(same) == sorted(neutral & options)
    assert set(changed) == options - neutral | {"seed_everything"}


def test_precision_is_fingerprinted_and_every_other_trainer_key_declared(tiny_model, files):
    assert fingerprint(tiny_model, files, {})["precision"] == "32-true"
    assert {f"trainer.{k}" for k in TRAINER_KEYS} - set(RECORD_NEUTRAL) == {"trainer.precision"}
