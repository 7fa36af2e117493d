"""On a CUDA GPU: CUDA-graph decode steps replay exactly what the same steps compute eagerly, and a
whole run uses them. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, base_args, encode, read
from transformers import AutoModelForCausalLM, AutoTokenizer

from lgen.attention import packed_decode, packing_needed
from lgen.cli import main
from lgen.steppers import GraphStepper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_give_the_eager_logits(tiny_model, dtype):
    """The same static-cache step, captured and replayed or run eagerly, across a compaction to a
    smaller bucket: bit for bit the same logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    ids, mask = (t.cuda() for t in encode(tok, PROMPTS * 2))
    runs = {}
    with torch.inference_mode():
        for graph in (True, False):
            stepper = GraphStepper(model, 16, graph=graph)
            logits = [stepper.prefill(ids, mask, 1)]
            with packed_decode(packing_needed()):
                for step in range(12):
                    token = logits[-1].argmax(-1)
                    if step == 5:  # 20 rows -> 11 live rows in a bucket of 12
                        token = token[stepper.compact(torch.arange(0, 11, device="cuda"))]
                    logits.append(stepper.step(token).clone())
            runs[graph] = logits
    for replayed, eager in zip(runs[True], runs[False]):
        assert torch.equal(replayed, eager)


def test_a_run_on_the_gpu_matches_generate(tiny_model, code_jsonl, tmp_path):
    """float32 on CUDA: the compact engine with CUDA graphs gives model.generate's records."""
    records = {}
    for engine in ("compact", "generate"):
        out = tmp_path / engine
        assert main(["predict", *base_args(tiny_model, code_jsonl, out), "--model.engine", engine,
                     "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                     "--trainer.enable_progress_bar", "false"]) == 0
        records[engine] = sorted((r["id"], r["prediction"], r["finish_reason"]) for r in read(out))
    assert len(records["compact"]) == len(PROMPTS) and records["compact"] == records["generate"]


def test_pool_graph_replays_give_the_eager_logits(tiny_model):
    """Continuous batching's pool step, captured once and replayed while groups join rows that
    were left free, gives the eager step's logits bit for bit."""
    from lgen.steppers import PoolStepper

    model = AutoModelForCausalLM.from_pretrained(tiny_model).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    groups = [[PROMPTS[i] for i in range(j, j + 3)] for j in (0, 3, 6)]
    runs = {}
    with torch.inference_mode():
        for graph in (True, False):
            pool = PoolStepper(model, rows=8, length=64, graph=graph)
            logits = torch.zeros(8, model.config.vocab_size, device="cuda")
            seen = []
            with packed_decode(packing_needed()):
                for step in range(15):
                    if step % 5 == 0:  # a group of 3 joins rows 0-2, 3-5, then 0-2 again (they ended)
                        slots = torch.arange(3, device="cuda") + (3 if step == 5 else 0)
                        ids, mask = (t.cuda() for t in encode(tok, groups[step // 5]))
                        logits[slots] = pool.admit(slots, ids, mask, 1)
                    logits = pool.step(logits.argmax(-1)).clone()
                    seen.append(logits)
            runs[graph] = seen
    for replayed, eager in zip(runs[True], runs[False]):
        assert torch.equal(replayed, eager)
