"""Offline fixtures: tokenizers built locally and tiny random Llama models saved to temporary folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CODE = [
    "int add(int a, int b) {\n    return a + b;\n}\n",
    "fn main() {\n    let s = \"{}\";\n    println!(\"{}\", s);\n}\n",
    "if (x) {\n    y = '{';\n} else {\n    y = '}';\n}\n",
    "/* a { comment */ void f() {\n    // } line\n    g();\n}}\n",
    "const f = () => {\n    return {a: 1, b: {c: 2}};\n};\n",
    "func Max(a, b int) int {\n\tif a > b {\n\t\treturn a\n\t}\n\treturn b\n}\n",
    "fn longest<'a>(x: &'a str) -> &'a str {\n    x\n}\n",
    "for (int i = 0; i < n; i++) {\n    s += \"\\\"}\";\n}\n",
]


def make_bpe_tokenizer(folder: Path, vocab_size: int = 160):
    """A byte-level BPE trained on a little brace-heavy code, so tokens like ``}}`` and ``{\\n`` exist."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CODE * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=256)
    fast.save_pretrained(folder)
    return fast


def make_word_tokenizer(folder: Path, words: int = 200):
    """Whitespace words ``w0 .. w{n-1}``: one token per word, so window arithmetic is exact by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=64)
    fast.save_pretrained(folder)
    return fast


def make_llama(folder: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, arch: str = "llama") -> Path:
    """A random causal LM saved as a model folder: ``arch`` ``llama`` or ``qwen2`` (biased q/k/v)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, bpe_tokenizer) -> Path:
    """A 2-layer random Llama over the BPE tokenizer, saved as a model folder."""
    return make_llama(tmp_path_factory.mktemp("tiny-llama"), bpe_tokenizer)


@pytest.fixture(scope="session")
def bf16_llama(tmp_path_factory, bpe_tokenizer) -> Path:
    """A 4-layer random Llama, wide enough that in bf16 batch composition changes greedy tokens."""
    return make_llama(tmp_path_factory.mktemp("bf16-llama"), bpe_tokenizer, layers=4, hidden=128)


@pytest.fixture(scope="session")
def word_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("word-llama")
    return make_llama(folder, make_word_tokenizer(folder))


# a chat template for the word tokenizer: "<s> role content </s>" per message, then "<s> assistant"
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


PROMPTS = [
    "int add(int a, int b) {",
    "fn main() {\n    let s = \"{}\";",
    "if (x) {",
    "void f() {\n    // } line",
    "const f = () => {",
    "func Max(a, b int) int {\n\tif a > b {",
    "for (int i = 0; i < n; i++) {",
    "fn longest<'a>(x: &'a str) -> &'a str {",
    "int g() {\n    return {",
    "void h(int x) {\n    switch (x) {",
]


@pytest.fixture
def code_jsonl(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"task_id": f"t/{i}", "prompt": p, "lang": "c" if i % 2 else "rust"}) + "\n")
    return path


def encode(tok, prompts: list[str]):
    """Left-padded ids and mask of ``prompts``."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def code_rules(tok, *, brace: bool = True):
    """Brace matching from level 1 (C family), EOS and length: the rules of a code completion run."""
    from lgen.decode.braces import token_table
    from lgen.decode.stopping import BraceMatching, EndOfSequence, Length, StopRules

    head = [BraceMatching(token_table(tok, "c"), start_level=1, language="c")] if brace else []
    return StopRules([*head, EndOfSequence([tok.eos_token_id]), Length()])


def decoded(rules, out, tok) -> list[tuple[str, str]]:
    """(prediction, finish_reason) of each row an engine generated."""
    return [(f.text, f.reason) for f in rules.finish(out.tokens, out.stop_rule, out.stop_step, tok)]


def decode_settings(config, **options):
    """:class:`lgen.decode.DecodeSettings` for ``config`` (its samples), with ``options``."""
    from lgen.decode import DecodeSettings

    return DecodeSettings(samples=int(config.num_return_sequences or 1), **options)


def compact(tok, config, *, synced=False, rules=None, tokenizer=None, **options):
    """The compact (lockstep) engine for ``config``, padding with the tokenizer's pad token."""
    from lgen.decode import CompactEngine

    return CompactEngine(config, decode_settings(config, **options), pad_token_id=tok.pad_token_id, synced=synced,
                         rules=rules, tokenizer=tokenizer)


def continuous(tok, config, *, rules, **options):
    """The continuous engine for ``config``, with ``rules`` making each pool's stopping rules."""
    from lgen.decode import ContinuousEngine

    return ContinuousEngine(config, decode_settings(config, **options), rules=rules, tokenizer=tok,
                            pad_token_id=tok.pad_token_id)


def runs_generate_instead(model, because: str) -> None:
    """What trying ``model`` in a pool shows: ``engine: auto`` runs ``model.generate`` one prompt at a
    time, saying why (``because``, its start), and ``engine: compact`` is refused by name with it."""
    from transformers import GenerationConfig

    from lgen.decode import DecodeSettings, settle
    from lgen.errors import UnsupportedModel
    from lgen.hf.architecture import Architecture

    greedy = GenerationConfig(do_sample=False)
    architecture = Architecture.of(model.config, type(model))
    assert architecture.compact_missing() == []  # nothing the config shows: only trying it does
    auto = settle(DecodeSettings.choose(greedy, architecture=architecture), model, asked="auto")
    assert (auto.engine, auto.one_prompt) == ("generate", True)
    assert len(auto.because) == 1 and auto.because[0].startswith(because), auto.because
    with pytest.raises(UnsupportedModel, match="model.engine: compact cannot run this model: " + re.escape(because)):
        settle(DecodeSettings.choose(greedy, engine="compact"), model, asked="compact")


def lgen(*args: str) -> int:
    """``lgen predict`` in this process, on the CPU (also on a GPU machine), without a progress bar."""
    from lgen.cli import main

    return main(["predict", *args, "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Complete-mode code completion of ``code_jsonl``-style rows: brace matching from level 1."""
    return ["--model.model_name_or_path", str(model), "--model.max_new_tokens", "40",
            "--model.use_brace_matching", "true", "--model.brace_matching_start_level", "1",
            "--data.data_files", str(data), "--data.mode", "complete", "--data.text_column_name", "prompt",
            "--data.id_column_name", "task_id", "--data.keep_columns", "[lang]", "--data.per_device_batch_size", "4",
            "--output_dir", str(out), *extra]


def read(out: Path, name: str = "00001-of-00001.test.jsonl") -> list[dict]:
    """The records of one shard."""
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def prompts_file(path: Path, n: int) -> Path:
    """``n`` rows ``{"task_id": "t/i", "prompt": ...}``, cycling through PROMPTS (some with trailing spaces)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"task_id": f"t/{i}", "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i % 3)}) + "\n")
    return path
