"""DeepSpeed ZeRO-3 on CPU (DeepSpeed's CPU accelerator, 2 gloo processes): the model is built
partitioned, and the lockstep compact engine (also batch-invariant) and synced ``generate`` give the
plain model's rows in bf16 (the precision of ``bf16-true``).

Lightning's DeepSpeedStrategy needs CUDA, so this drives DeepSpeed directly, as ``configure_model``
and the strategy do: DeepSpeed wraps an outer module whose one forward runs a whole generation (as
it wraps the LightningModule), with lgen's ZeRO-3 settings (:mod:`lgen.hf.zero3`). Skipped where
deepspeed is not installed (``scripts/setup.sh`` installs it when it can build it).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import PROMPTS, code_rules, compact, decoded, encode
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lgen.decode import GenerateEngine
from lgen.hf import precision, zero3

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")

ZERO3 = {"train_micro_batch_size_per_gpu": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


class Outer(torch.nn.Module):
    """Stands for the LightningModule: DeepSpeed wraps it, and its forward runs a whole batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        return fn(self.model)


def _worker(rank: int, folder: str, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    linear = torch.nn.functional.linear
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    config = zero3.inference_config({**copy.deepcopy(ZERO3), "bf16": {"enabled": True}})  # as bf16-true
    keep = HfDeepSpeedConfig(config)  # noqa: F841 (transformers holds it weakly)
    with deepspeed.zero.Init(config_dict_or_path=config):  # as Lightning does around configure_model
        sharded = AutoModelForCausalLM.from_pretrained(folder).eval()
    # zero.Init made the rotary frequencies bf16 too; on_predict_start recomputes them in float32
    ours, theirs = sharded.model.rotary_emb, plain.model.rotary_emb
    rotary = (ours.inv_freq.dtype, precision.rotary_in_float32(sharded), precision.rotary_in_float32(sharded),
              all(torch.equal(getattr(ours, n), getattr(theirs, n)) and getattr(ours, n).dtype == torch.float32
                  for n in ("inv_freq", "original_inv_freq")))
    partitioned = all(p.numel() == 0 for p in sharded.parameters())  # each rank holds only its shard
    blocks = zero3.leaf_blocks(sharded, config)
    ds_engine = deepspeed.initialize(model=Outer(sharded), config=config)[0]
    # inside a block nothing is hooked: DeepSpeed gathers the block's weights with one pair of hooks
    inner_hooks = sum(len(m._forward_pre_hooks) for m in sharded.model.layers[0].modules()
                      if m is not sharded.model.layers[0])
    # DeepSpeed's training default swaps F.linear process-wide (other GPU kernels, other bf16 rows)
    # and would also run the plain model below through the swap, hiding any difference
    linear_kept = torch.nn.functional.linear is linear
    calls, resets = [], []
    sharded.register_forward_pre_hook(lambda *_: calls.append(1))
    coordinator = ds_engine.optimizer.get_param_coordinator()
    reset = coordinator.reset_step
    coordinator.reset_step = lambda: (resets.append(1), reset())[1]
    zero3.step_per_forward(ds_engine, sharded)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    ids, mask = encode(tok, PROMPTS[:3] if rank == 0 else PROMPTS[3:])
    keys = torch.arange(ids.shape[0]) + 10 * rank
    same = {}
    for do_sample in (False, True):
        config = GenerationConfig(do_sample=do_sample, top_k=20, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)

        def rows(m, synced):
            rules = code_rules(tok)
            out = compact(tok, config, compact_every=2, synced=synced).run(
                m, ids, mask, max_new_tokens=24 if rank == 0 else 40, rules=rules, row_keys=keys)
            return decoded(rules, out, tok)

        same[do_sample] = ds_engine(lambda m: rows(m, True)) == rows(plain, False)
    greedy = GenerationConfig(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def generated(m, synced):
        rules = code_rules(tok)
        out = GenerateEngine(greedy, synced=synced).run(m, ids, mask, max_new_tokens=40, rules=rules, row_keys=None)
        return decoded(rules, out, tok)

    same["generate"] = ds_engine(lambda m: generated(m, True)) == generated(plain, False)

    def invariant_rows(m, synced):  # batch-invariant mode: rows laid out from position 0, fixed tiles
        rules = code_rules(tok)
        out = compact(tok, greedy, compact_every=2, synced=synced, invariant=True).run(
            m, ids, mask, max_new_tokens=24 if rank == 0 else 40, rules=rules, row_keys=None)
        return decoded(rules, out, tok)

    same["invariant"] = ds_engine(lambda m: invariant_rows(m, True)) == invariant_rows(plain, False)
    # one ZeRO-3 trace step per model forward (plus one per outer forward, DeepSpeed's own)
    results[rank] = (partitioned, same, len(calls), linear_kept, len(resets) - 4, blocks, inner_hooks, rotary)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero3_lockstep_gives_the_plain_rows(tiny_model):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tiny_model), port, results), nprocs=2)
    for rank in (0, 1):
        partitioned, same, forwards, linear_kept, trace_steps, blocks, inner_hooks, rotary = results[rank]
        assert rotary == (torch.bfloat16, 1, 0, True), rank  # fixed once, then the plain model's exactly
        assert blocks == ["LlamaDecoderLayer"] and inner_hooks == 0, rank  # and the rows stay the same
        assert partitioned, rank
        assert linear_kept, rank
        assert same == {False: True, True: True, "generate": True, "invariant": True}, rank
        assert trace_steps == forwards, rank
    assert results[0][2] == results[1][2]  # every forward on both ranks, though rank 0 has less to do


def test_blocks_left_to_deepspeed_where_whole_ones_would_not_fit(tiny_model):
    block = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).model.layers[0].parameters())
    cases = [
        ({"stage": 3}, ["LlamaDecoderLayer"]),
        ({"stage": 3, "stage3_max_live_parameters": block}, ["LlamaDecoderLayer"]),
        ({"stage": 3, "stage3_max_live_parameters": block - 1}, []),  # one block is more than may be live
        ({"stage": 3, "offload_param": {"device": "nvme"}}, []),  # read in one go past the swap buffers
        ({"stage": 3, "leaf_module": {"classes": ["LlamaMLP"]}}, []),  # the user's own choice
    ]
    for zero, expected in cases:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert zero3.leaf_blocks(model, {"zero_optimization": zero}) == expected, zero
        assert getattr(model.model.layers[0], "_z3_leaf", False) == bool(expected), zero

