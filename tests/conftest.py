"""Offline fixtures: tokenizers built locally and tiny random Llama models saved to temporary folders."""

from __future__ import annotations

import json
import os
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


def make_llama(folder: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
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
def word_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("word-llama")
    return make_llama(folder, make_word_tokenizer(folder))


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
