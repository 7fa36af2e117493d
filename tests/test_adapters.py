"""PEFT adapters built here with peft on the tiny model: LoRA and (IA)^3 merged or not, prompt tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, base_args, lgen, read
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM


def save_adapter(base: Path, config, folder: Path) -> Path:
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make every adapter weight count
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (0.5 if "lora" in name else 1.0) + (1.0 if "ia3" in name else 0.0))
    model.save_pretrained(folder)
    return folder


def predictions(out: Path) -> dict[str, str]:
    return {r["id"]: r["prediction"] for r in read(out)}


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapter_merged_and_unmerged_give_the_same_tokens(tiny_model, code_jsonl, tmp_path, kind):
    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
              if kind == "lora" else
              IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                        task_type="CAUSAL_LM"))
    adapter = save_adapter(tiny_model, config, tmp_path / kind)
    runs = {"base": [], "merged": ["--model.adapter_name_or_path", str(adapter)],
            "unmerged": ["--model.adapter_name_or_path", str(adapter), "--model.merge_adapter", "false"]}
    got = {}
    for name, extra in runs.items():
        assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / name, *extra)) == 0
        got[name] = predictions(tmp_path / name)
    assert len(got["merged"]) == len(PROMPTS)
    assert got["merged"] == got["unmerged"]
    assert sum(got["merged"][k] != got["base"][k] for k in got["base"]) >= len(PROMPTS) // 2
    written = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert written["peft_type"] == kind.upper()
    assert not (tmp_path / "base" / "adapter_config.json").exists()


def test_prompt_tuning_virtual_tokens_come_off_block_size(word_model, tmp_path):
    adapter = save_adapter(word_model, PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"),
                           tmp_path / "pt")
    data = tmp_path / "words.jsonl"
    words = [f"w{i}" for i in range(20)]
    data.write_text(json.dumps({"task_id": "a", "prompt": " ".join(words)}) + "\n")
    common = ["--model.model_name_or_path", str(word_model), "--model.max_new_tokens", "5",
              "--data.data_files", str(data), "--data.mode", "complete", "--data.text_column_name", "prompt",
              "--data.id_column_name", "task_id", "--data.block_size", "30"]
    assert lgen(*common, "--output_dir", str(tmp_path / "base")) == 0
    assert lgen(*common, "--model.adapter_name_or_path", str(adapter), "--output_dir", str(tmp_path / "pt-out")) == 0
    # window = block_size - max_new_tokens (- 8 virtual tokens): 25 keeps all 20 words, 17 the last 17
    assert read(tmp_path / "base")[0]["prompt"] == " ".join(words)
    record = read(tmp_path / "pt-out")[0]
    assert record["prompt"] == " ".join(words[3:])
    assert len(record["prediction"].split()) <= 5
    written = json.loads((tmp_path / "pt-out" / "adapter_config.json").read_text())
    assert written["num_virtual_tokens"] == 8 and written["peft_type"] == "PROMPT_TUNING"


def test_prompt_tuning_refuses_the_compact_engine(word_model, tmp_path, capsys):
    adapter = save_adapter(word_model, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                           tmp_path / "pt")
    data = tmp_path / "w.jsonl"
    data.write_text(json.dumps({"prompt": "w1 w2"}) + "\n")
    rc = lgen("--model.model_name_or_path", str(word_model), "--model.max_new_tokens", "3",
              "--model.adapter_name_or_path", str(adapter), "--model.engine", "compact",
              "--data.data_files", str(data), "--data.text_column_name", "prompt", "--output_dir", str(tmp_path / "o"))
    assert rc == 2
    assert "model.engine: compact does not implement ['prompt-learning adapters']" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_zero3_trace_step_per_forward_reaches_peft_generate(tiny_model, kind):
    """peft's generate calls the base model's, so the ZeRO-3 trace reset must hook the base model."""
    from types import SimpleNamespace

    from lgen.hf import zero3

    config = (LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM") if kind == "lora"
              else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).eval()
    resets, forwards = [], []
    coordinator = SimpleNamespace(reset_step=lambda: resets.append(1))
    zero3.step_per_forward(SimpleNamespace(optimizer=SimpleNamespace(get_param_coordinator=lambda: coordinator)), model)
    model.get_base_model().register_forward_pre_hook(lambda *_: forwards.append(1))
    model.generate(input_ids=torch.tensor([[3, 4, 5]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                   max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(forwards) == 5 and len(resets) == 5
