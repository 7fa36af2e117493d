"""Every causal-LM type of the installed transformers, a tiny random float32 model each: the
engine ``engine: auto`` picks, the compact engine and ``model.generate`` give each prompt the text
``model.generate`` gives it alone, in left-padded batches of prompts of 5 to 37 tokens (most longer
than the sliding windows and chunks, which are 8); the compact engine is refused by name where it
cannot run a type. Types whose tiny config cannot be built are skipped with the reason.

``tests/architectures.json`` holds the engine ``engine: auto`` ran for each type the last time the
matrix was written (``python benchmarks/architectures.py --write``); with the same transformers, a
type that falls from the compact engine to ``model.generate`` fails here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from architectures import SCALES, VOCAB, names, tiny_model
from conftest import make_word_tokenizer
from transformers import GenerationConfig

from lgen.batch import Batch, Group, left_pad
from lgen.decode import DecodeSettings, make_engine, settle
from lgen.decode.stopping import EndOfSequence, Length, StopRules
from lgen.errors import ConfigError
from lgen.hf.architecture import Architecture

LENGTHS = [5, 9, 14, 21, 30, 37]
NEW = 16
GROUP = 4
CONFIG = GenerationConfig(do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
SNAPSHOT = Path(__file__).with_name("architectures.json")


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(4, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("matrix-words"), words=VOCAB - 4)


def alone(model: torch.nn.Module, tok, rows: list[list[int]]) -> list[str]:
    """``model.generate``'s text for each prompt, one at a time."""
    out = []
    for ids in rows:
        ids = torch.tensor([ids], device=model.device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=CONFIG)
        out.append(tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def batches(rows: list[list[int]], *, streamed: bool, device: torch.device) -> list[Batch]:
    """The prompts in left-padded batches of :data:`GROUP`, as one stream when ``streamed``."""
    examples = [{"id": i, "part": [1, 1], "prompt_ids": ids} for i, ids in enumerate(rows)]
    chunks = [examples[i:i + GROUP] for i in range(0, len(examples), GROUP)]
    out = []
    for k, chunk in enumerate(chunks):
        ids, mask = left_pad([e["prompt_ids"] for e in chunk], 0)
        last = k == len(chunks) - 1
        group = Group(stream=0, last=last, pool_rows=GROUP, pool_length=max(LENGTHS) + NEW, group_rows=GROUP,
                      max_new_tokens=NEW, final=last, budget=1 << 30) if streamed else None
        out.append(Batch(ids.to(device), mask.to(device), max_new_tokens=NEW, padding=False, examples=chunk,
                         group=group))
    return out


def texts(model: torch.nn.Module, tok, settings: DecodeSettings, rows: list[list[int]]) -> list[str]:
    """Each prompt's text from the engine ``settings`` pick (as they run on the model's device: CUDA
    graphs there), the prompts in padded batches."""
    engine = make_engine(settings.on(model.device), CONFIG, rules=lambda: StopRules([EndOfSequence([]), Length()]),
                         tokenizer=tok, pad_token_id=0)
    got = {}
    for batch in batches(rows, streamed=settings.continuous(lockstep=False), device=model.device):
        for example, _, finished in engine.generate(model, batch, row_keys=None).rows:
            got[example["id"]] = finished.text
    return [got.get(i) for i in range(len(rows))]


def load(name: str, tok, rows: list[list[int]], *, device: str = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, list[str]]:
    """The type's tiny model at the largest scale at which its text depends on its context (the
    prompts reversed give other text), and its ``model.generate`` text for each prompt alone."""
    try:
        for scale in SCALES:
            model = tiny_model(name, scale=scale).to(device=device, dtype=dtype)
            reference = alone(model, tok, rows)
            if sum(a != b for a, b in zip(reference, alone(model, tok, [r[-2::-1] + r[-1:] for r in rows]))) >= 3:
                break
    except Exception as err:  # transformers' own model cannot run its tiny config: nothing to compare
        pytest.skip(f"{name}: the tiny config cannot be built or run by transformers: {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:160]}")
    return model, reference


def engine_of(settings: DecodeSettings) -> str:
    return settings.engine + (", one prompt" if settings.one_prompt else "")


def expected_engines() -> dict[str, str]:
    """The snapshot's engine per type, if it was written with this transformers."""
    import transformers

    snapshot = json.loads(SNAPSHOT.read_text())
    return snapshot["engines"] if snapshot["transformers"] == transformers.__version__ else {}


@pytest.mark.parametrize("name", names())
def test_every_engine_gives_each_prompt_its_text_alone(name, tok):
    rows = prompts()
    model, reference = load(name, tok, rows)
    architecture = Architecture.of(model.config, type(model))
    poolable = not architecture.compact_missing()

    def settled(engine: str) -> DecodeSettings:
        chosen = DecodeSettings.choose(CONFIG, engine=engine, architecture=architecture)
        return settle(chosen, model, asked=engine, poolable=poolable)

    auto = settled("auto")
    assert texts(model, tok, auto, rows) == reference, f"engine: auto ({engine_of(auto)})"
    generate = settled("generate")
    assert texts(model, tok, generate, rows) == reference, f"engine: generate ({engine_of(generate)})"
    assert generate.one_prompt == auto.one_prompt or auto.engine == "compact"
    if auto.engine == "generate":  # the compact engine refuses by name what auto does not give it
        with pytest.raises(ConfigError, match="model.engine: compact"):
            settled("compact")
        assert auto.because
    expected = expected_engines().get(name)
    assert expected in (None, engine_of(auto)), f"engine: auto ran {engine_of(auto)}, {expected} before"


def test_the_snapshot_lists_most_types_on_the_compact_engine():
    """The written matrix: at least 120 types on the compact engine, every attention family the
    compact engine is built for among them."""
    engines = json.loads(SNAPSHOT.read_text())["engines"]
    assert sum(e == "compact" for e in engines.values()) >= 120
    families = ["mistral", "ministral", "gemma2", "gemma3_text", "gemma3n_text", "gemma4_text",  # sliding windows
                "gpt_oss", "olmo3", "cohere2", "llama4_text",  # sinks, chunks, temperature by position
                "deepseek_v2", "deepseek_v3", "minicpm3", "glm4_moe_lite",  # multi-head latent attention
                "mixtral", "qwen3_moe", "olmoe", "falcon+alibi", "gemma4_text+kv_sharing", "llama", "qwen2"]
    assert {f: engines.get(f) for f in families} == dict.fromkeys(families, "compact")
