"""Batch-invariant decoding: each row's result is the one it gets alone, bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPTS, code_rules, compact, continuous, decoded, encode, lgen, make_bpe_tokenizer, prompts_file
from conftest import read as read_records
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lgen.batch import Batch, Group
from lgen.errors import ConfigError
from lgen.kernels import invariant
from lgen.module import GenerationModule

CPU = torch.device("cpu")
TILES = invariant.Tiles.for_device(CPU)


def load(path, dtype=torch.bfloat16, device="cpu"):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, padding_side="left")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_ops_give_a_row_its_result_alone(dtype):
    torch.manual_seed(0)
    x = torch.randn(37, 96, dtype=dtype)
    w, bias = torch.randn(96, 200, dtype=dtype), torch.randn(200, dtype=dtype)
    cases = {
        "mm": lambda t: t @ w,
        "addmm": lambda t: torch.addmm(bias, t, w),
        "addmm, a bias per row": lambda t: torch.addmm(t[:, :1].expand(-1, 200), t, w),
        "linear 3d": lambda t: torch.nn.functional.linear(t[:, None].expand(-1, 3, -1), w.T, bias)[:, 1],
        "mean": lambda t: t.float().pow(2).mean(-1, keepdim=True),
        "sum": lambda t: t.sum(-1),
        "softmax": lambda t: t.float().softmax(-1),
        "log_softmax": lambda t: t.float().log_softmax(-1),
        "cumsum": lambda t: t.cumsum(-1),
        "layer_norm": lambda t: torch.nn.functional.layer_norm(t, (96,), torch.ones(96, dtype=dtype)),
    }
    for (name, fn), inference in [(case, mode) for case in cases.items() for mode in (False, True)]:
        plain = fn(x)
        with torch.inference_mode(inference), invariant.BatchInvariantOps(TILES):  # inference mode: linear comes whole
            batch = fn(x)
            alone = torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])
            reordered = fn(x.flip(0)).flip(0)
        assert torch.equal(batch, alone), (name, inference)
        assert torch.equal(batch, reordered), (name, inference)
        # the same computation, in another order (in bf16 a sum rounded once more can move by an ulp)
        torch.testing.assert_close(batch.float(), plain.float(), msg=name,
                                   **({"rtol": 0.02, "atol": 0.25} if dtype == torch.bfloat16 else {}))


def test_every_layer_of_the_quickstart_shape_gives_a_row_its_output_alone():
    """SmolLM2-135M-Instruct's shape (width 576, MLP 1536, 9 heads over 3 key/value heads, its
    vocabulary), 2 layers of random bf16 weights: every module's output for a row, in the prefill
    and a decode step, is bit for bit the same alone and among 16 rows of other lengths. (A linear
    that reached the mode whole under inference mode ran on the full batch: 14 of 16 quickstart
    records agreed between batch 1 and 16.)"""
    from transformers import LlamaConfig

    from lgen.batch import left_pad
    from lgen.decode.steppers import PoolStepper
    from lgen.kernels import decoding

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=2, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 49152, (n,), generator=generator).tolist() for n in range(9, 41, 2)]

    def outputs(rows: list[int]) -> list[torch.Tensor]:
        ids, mask = left_pad([prompts[i] for i in rows], 0)
        width = len(prompts[rows[0]])
        seen: list[torch.Tensor] = []

        def keep(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[0] == len(rows):
                seen.append(out[0, :width].clone() if out.shape[1] > 1 else out[0].clone())

        with torch.inference_mode(), decoding(model, invariant=True):
            pool = PoolStepper(model, rows=len(rows), length=ids.shape[1] + 2, graph=False, aligned=True)
            hooks = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
            try:
                pool.prefill(ids, mask, 1)
                pool.step(torch.full((len(rows),), 42))
            finally:
                for hook in hooks:
                    hook.remove()
        return seen

    alone, together = outputs([3]), outputs([3] + [i for i in range(len(prompts)) if i != 3])
    assert len(alone) == len(together) > 30
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_matmul_by_batch_and_by_query(dtype):
    """Also with b a transposed view (keys as ``k.transpose(1, 2)``): a tile padded with zeros is a
    fresh tensor, a whole tile a view, and the two must reach the kernel in one layout."""
    torch.manual_seed(0)
    a = torch.randn(3 * TILES.batch + 5, 13, 64, dtype=dtype)
    n = a.shape[0]
    for b in (torch.randn(n, 64, 40, dtype=dtype), torch.randn(n, 40, 64, dtype=dtype).transpose(1, 2)):
        with invariant.BatchInvariantOps(TILES):
            whole = torch.bmm(a, b)
            pieces = torch.cat([torch.bmm(a[i:i + 1, j:j + 1], b[i:i + 1]) for i in range(n) for j in range(13)])
            tiles = torch.cat([torch.bmm(a[i:i + TILES.batch], b[i:i + TILES.batch]) for i in range(0, n, TILES.batch)])
        assert torch.equal(whole, pieces.reshape(n, 13, 40))
        assert torch.equal(whole, tiles)
        torch.testing.assert_close(whole, torch.bmm(a, b))


def test_chunked_attention_is_attention_and_ignores_the_cache_length():
    torch.manual_seed(0)
    rows, heads, kv, dim, keys = 3, 8, 2, 16, 150
    q, k, v = torch.randn(rows, heads, 1, dim), torch.randn(rows, kv, keys, dim), torch.randn(rows, kv, keys, dim)
    lengths = torch.tensor([150, 70, 9])
    allowed = torch.arange(keys)[None, None, None, :] < lengths[:, None, None, None]
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    with invariant.BatchInvariantOps(TILES):
        out, _ = invariant.chunked_attention(module, q, k, v, mask, tiles=TILES, scaling=0.25)
        # row 2 alone, with only its 9 keys
        alone, _ = invariant.chunked_attention(module, q[2:], k[2:, :, :9], v[2:, :, :9], mask[2:, ..., :9],
                                               tiles=TILES, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                           attn_mask=allowed, scale=0.25)
    assert out.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2:], alone)
    k[2, :, 9:] = 1e4  # what lies past a row's keys (another row's stale cache) takes no weight
    with invariant.BatchInvariantOps(TILES):
        again, _ = invariant.chunked_attention(module, q, k, v, mask, tiles=TILES, scaling=0.25)
    assert torch.equal(again[2], out[2])


def test_attention_and_ops_are_put_back():
    from lgen.kernels import backend

    with pytest.raises(RuntimeError, match="boom"), invariant.batch_invariant(CPU):
        assert backend._STATE.front is not None and _get_current_dispatch_mode() is not None
        raise RuntimeError("boom")
    assert backend._STATE.front is None
    assert _get_current_dispatch_mode() is None


def greedy(tok):
    return GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


PROMPTS20 = PROMPTS + [p + " x" for p in PROMPTS]


def compact_texts(model, tok, prompts, *, config=None, every=4, keys=None, invariant_mode=True, **options):
    ids, mask = (t.to(model.device) for t in encode(tok, prompts))
    rules = code_rules(tok, brace=False)
    out = compact(tok, config or greedy(tok), compact_every=every, invariant=invariant_mode, **options).run(
        model, ids, mask, max_new_tokens=40, rules=rules, row_keys=None if keys is None else keys.to(model.device))
    return [text for text, _ in decoded(rules, out, tok)]


def test_compact_engine_rows_alone_and_together(bf16_llama):
    model, tok = load(bf16_llama)
    together = compact_texts(model, tok, PROMPTS20)
    assert [compact_texts(model, tok, [p])[0] for p in PROMPTS20[::2]] == together[::2]  # every other one, alone
    assert compact_texts(model, tok, PROMPTS20, every=1) == together
    assert compact_texts(model, tok, PROMPTS20[::-1], every=8)[::-1] == together
    assert len(set(together)) > 10


def test_sampled_rows_alone_and_together(bf16_llama):
    model, tok = load(bf16_llama)
    config = GenerationConfig(do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=2,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    keys = torch.arange(2 * len(PROMPTS20), dtype=torch.int64) * 7919 + 3
    together = compact_texts(model, tok, PROMPTS20, config=config, keys=keys)
    alone = [t for i, p in enumerate(PROMPTS20) if i % 3 == 0
             for t in compact_texts(model, tok, [p], config=config, keys=keys[2 * i: 2 * i + 2])]
    assert alone == [t for i, t in enumerate(together) if i // 2 % 3 == 0]


def continuous_texts(model, tok, prompts, *, group: int, pool_rows: int, graphs: bool = False,
                     invariant_mode: bool = True, **options) -> list[str]:
    """The continuous engine over one stream of ``prompts`` in groups of ``group``."""
    engine = continuous(tok, greedy(tok), rules=lambda: code_rules(tok, brace=False), compact_every=3,
                        invariant=invariant_mode, cuda_graphs=graphs, **options)
    got = {}
    starts = list(range(0, len(prompts), group))
    width = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    for n, start in enumerate(starts):
        chunk = prompts[start:start + group]
        ids, mask = (t.to(model.device) for t in encode(tok, chunk))
        examples = [{"id": start + i} for i in range(len(chunk))]
        last = n == len(starts) - 1
        g = Group(stream=0, last=last, group_rows=group, pool_rows=pool_rows, pool_length=width + 40,
                  max_new_tokens=40, final=last, budget=pool_rows * (width + 43))
        batch = Batch(ids, mask, max_new_tokens=40, padding=False, examples=examples, group=g)
        out = engine.generate(model, batch, row_keys=None)
        got.update({ex["id"]: f.text for ex, _, f in out.rows})
    return [got[i] for i in range(len(prompts))]


def test_continuous_engine_gives_the_compact_engines_rows(bf16_llama):
    model, tok = load(bf16_llama)
    expected = compact_texts(model, tok, PROMPTS20)
    assert continuous_texts(model, tok, PROMPTS20, group=3, pool_rows=7) == expected
    assert continuous_texts(model, tok, PROMPTS20, group=1, pool_rows=2) == expected


def test_another_architecture(tmp_path):
    """GPT-2: learned positions, layer norm, Conv1D (addmm) projections, multi-head attention (in
    bf16 the plain engine agrees on 11 of these 20 rows alone and together)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_bpe_tokenizer(tmp_path / "tok")
    config = GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=256, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    model, tok = load(tmp_path / "gpt2")
    together = compact_texts(model, tok, PROMPTS20)
    assert [compact_texts(model, tok, [p])[0] for p in PROMPTS20[1::2]] == together[1::2]
    assert compact_texts(model, tok, PROMPTS20, every=1) == together


def test_lgen_predict_bf16_records_do_not_depend_on_batch_size_or_compact_every(bf16_llama, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 16)
    runs = {}
    for name, extra in {"batch 1": ("--data.per_device_batch_size", "1"),
                        "batch 16": ("--data.per_device_batch_size", "16", "--model.compact_every", "8"),
                        "compact_every 1": ("--data.per_device_batch_size", "4", "--model.compact_every", "1")}.items():
        out = tmp_path / name.replace(" ", "_")
        assert lgen("--model.model_name_or_path", str(bf16_llama), "--model.max_new_tokens", "24",
                    "--model.torch_dtype", "bfloat16", "--trainer.precision", "bf16-true",
                    "--model.batch_invariant", "true", "--data.data_files", str(data), "--data.mode", "complete",
                    "--data.text_column_name", "prompt", "--data.id_column_name", "task_id",
                    "--output_dir", str(out), *extra) == 0
        runs[name] = sorted((r["id"], r["prediction"], r["finish_reason"]) for r in read_records(out))
    assert len(runs["batch 1"]) == 16
    assert runs["batch 16"] == runs["batch 1"]
    assert runs["compact_every 1"] == runs["batch 1"]


def test_settings_it_cannot_run_are_refused(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="compact engine"):
        GenerationModule(str(tiny_model), 8, engine="generate", batch_invariant=True)
    with pytest.raises(ConfigError, match="compact engine.*num_beams"):
        GenerationModule(str(tiny_model), 8, generation_kwargs={"num_beams": 2}, batch_invariant=True)
    with pytest.raises(ConfigError, match="torch_compile"):
        GenerationModule(str(tiny_model), 8, batch_invariant=True, torch_compile=True)
    capped = tmp_path / "capped"
    shutil.copytree(tiny_model, capped)
    config = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    with pytest.raises(ConfigError, match="soft-caps"):
        GenerationModule(str(capped), 8, batch_invariant=True)
    assert "batch_invariant" in GenerationModule(str(tiny_model), 8, batch_invariant=True).settings()
    assert "batch_invariant" not in GenerationModule(str(tiny_model), 8).settings()  # old outputs still resume


def test_align_left_moves_prompts_to_position_zero():
    from lgen.decode.steppers import align_left

    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4], [0, 0, 0, 9]])
    mask = (ids != 0).long()
    aligned, kept = align_left(ids, mask)
    assert kept.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert (aligned * kept).tolist() == [[5, 6, 0, 0], [1, 2, 3, 4], [9, 0, 0, 0]]
    # one token wide: widened, so that a prefill never has a decode step's single query
    aligned, kept = align_left(torch.tensor([[7], [8]]), torch.ones(2, 1, dtype=torch.long))
    assert aligned[:, 0].tolist() == [7, 8] and kept.tolist() == [[1, 0], [1, 0]]
