"""On a CUDA GPU, float32: the attention and state-layer families the compact engine runs, through CUDA graphs and
span attention, give each prompt ``model.generate``'s text alone (the CPU matrix's test, on the
GPU path). bf16 is counted, not asserted: ``python benchmarks/architectures.py --device cuda
--dtype bfloat16``. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from architectures import VOCAB
from conftest import make_word_tokenizer
from test_architectures import CONFIG, load, prompts, texts

from lgen.decode import DecodeSettings, settle
from lgen.hf.architecture import Architecture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAMILIES = [
    "llama", "qwen2", "qwen3", "phi3", "starcoder2", "gpt_bigcode", "gpt_neox", "granite", "codegen",  # full attention
    "mistral", "gemma2", "gemma3_text", "cohere2", "olmo3", "gpt_oss", "moshi",  # sliding windows, sinks
    "llama4_text",  # chunks, and a temperature by position
    "deepseek_v3", "minicpm3", "glm4_moe_lite",  # multi-head latent attention
    "gemma4_text", "gemma4_text+kv_sharing", "gemma3n_text",  # per-layer head sizes, shared key/value layers
    "mixtral", "qwen3_moe", "olmoe", "qwen2_moe",  # mixtures of experts under CUDA graphs
    "falcon+alibi",  # ALiBi
    "qwen3_next", "qwen3_5_text", "mamba2", "mamba", "nemotron_h", "jamba", "lfm2",  # recurrent and conv states
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("gpu-matrix-words"), words=VOCAB - 4)


@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_graph_steps_give_each_prompt_its_text_alone(name, tok):
    rows = prompts()
    model, reference = load(name, tok, rows, device="cuda")
    architecture = Architecture.of(model.config, type(model))
    chosen = DecodeSettings.choose(CONFIG, engine="compact", architecture=architecture)
    settings = settle(chosen, model, asked="compact").on(model.device)
    assert settings.cuda_graphs
    assert texts(model, tok, settings, rows) == reference
