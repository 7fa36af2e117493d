"""Tensor parallelism (ModelParallelStrategy, transformers' plans) on CPU processes over gloo: the
same float32 records as one process, with 2 and 4 ranks, on Llama and Qwen2; resume across
degrees; named errors before any weights load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lgen as lgen_here
from conftest import make_llama, prompts_file
from test_distributed import base, env, records

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over loopback")


def strategy(tmp: Path, **init_args: int) -> list[str]:
    """``--config`` of a ModelParallelStrategy (the command line takes a strategy only by name)."""
    path = tmp / f"tp-{'-'.join(f'{k}{v}' for k, v in init_args.items())}.yaml"
    path.write_text(json.dumps({"trainer": {"strategy": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": init_args}}}))
    return ["--config", str(path)]


def lgen(argv: list[str]) -> str:
    """``lgen`` in processes on CPUs (gloo), with any GPU hidden: transformers puts shards on the
    machine's accelerator."""
    result = subprocess.run([sys.executable, "-m", "lgen", *argv], capture_output=True, text=True, timeout=600,
                            env=dict(env(), CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def here(*args: object) -> list[str]:
    """``base``'s arguments for :func:`conftest.lgen`, which runs ``predict`` in this process."""
    return base(*args)[1:]


def tensor_parallel(tmp: Path, devices: int) -> list[str]:
    return [*strategy(tmp), "--trainer.devices", str(devices)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe_tokenizer) -> dict[str, Path]:
    """8 attention heads and 4 key/value heads: whole heads on 1, 2 or 4 ranks."""
    return {arch: make_llama(tmp_path_factory.mktemp(f"tp-{arch}"), bpe_tokenizer, heads=8, kv_heads=4, arch=arch)
            for arch in ("llama", "qwen2")}


# brace matching (base), a stop string, and pools of 3 rows that new prompts join (continuous batching)
STOPS = ["--model.stop_strings", '[";"]']


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_and_four_ranks_give_the_one_process_records(models, arch, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 11)
    lgen(base(models[arch], data, tmp_path / "one", *STOPS))
    expected = records(tmp_path / "one")
    assert len(expected) == 11
    assert {"brace_matching", "stop_string", "length"} <= {json.loads(r)["finish_reason"] for r in expected}
    for devices in (2, 4):
        out = tmp_path / f"tp{devices}"
        err = lgen(base(models[arch], data, out, *STOPS, *tensor_parallel(tmp_path, devices)))
        assert f"tensor parallel: {devices} ranks" in err
        assert err.count("tensor parallel:") == 1, err  # rank 0 says it
        # one group, so one shard, written by its first rank
        assert sorted(p.name for p in out.glob("*.jsonl")) == ["00001-of-00001.test.jsonl"]
        assert records(out) == expected, devices
        assert json.loads((out / "summary.json").read_text())["runs"][-1]["world_size"] == devices


def test_sampled_records_on_two_ranks(models, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 6)
    sampled = ["--model.generation_kwargs", '{do_sample: true, temperature: 0.8, top_p: 0.95, num_return_sequences: 3}',
               *STOPS]
    lgen(base(models["llama"], data, tmp_path / "one", *sampled))
    lgen(base(models["llama"], data, tmp_path / "two", *sampled, *tensor_parallel(tmp_path, 2)))
    got = records(tmp_path / "two")
    assert len(got) == 18 and got == records(tmp_path / "one")
    assert len({json.loads(r)["prediction"] for r in got}) > 9  # sampled: a prompt's samples differ


def test_the_generate_engine_on_two_ranks(models, tmp_path):
    """``engine: generate`` (model.generate over sharded weights), batch by batch."""
    data = prompts_file(tmp_path / "p.jsonl", 6)
    engine = ["--model.engine", "generate", *STOPS]
    lgen(base(models["llama"], data, tmp_path / "one", *engine))
    lgen(base(models["llama"], data, tmp_path / "two", *engine, *tensor_parallel(tmp_path, 2)))
    assert len(records(tmp_path / "one")) == 6 and records(tmp_path / "two") == records(tmp_path / "one")


def test_resume_with_another_degree(models, tmp_path):
    """A run cut short on 2 ranks, resumed on 1 process, then found complete on 2: the one-process records."""
    data = prompts_file(tmp_path / "p.jsonl", 11)
    lgen(base(models["llama"], data, tmp_path / "one", *STOPS))
    out = tmp_path / "out"
    lgen(base(models["llama"], data, out, *STOPS, *tensor_parallel(tmp_path, 2)))
    shard = out / "00001-of-00001.test.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:4]))  # as if stopped after 4 records
    err = lgen(base(models["llama"], data, out, *STOPS))
    assert "this run: 7 records" in err, err
    assert records(out) == records(tmp_path / "one")
    err = lgen(base(models["llama"], data, out, *STOPS, *tensor_parallel(tmp_path, 2)))
    assert "nothing to generate" in err and records(out) == records(tmp_path / "one")


@pytest.mark.parametrize(("devices", "init_args", "extra", "message"), [
    (3, {}, [], "tensor_parallel_size=3 does not divide the model's 8 attention heads"),
    (4, {"data_parallel_size": 2, "tensor_parallel_size": 2}, [], "data_parallel_size=2"),
    (2, {"tensor_parallel_size": 4}, [], "tensor_parallel_size 4 x data_parallel_size 1 must be the number of"),
    (2, {}, ["--model.torch_compile", "true", "--model.cuda_graphs", "true"],
     "torch_compile is not supported with tensor parallelism"),
])
def test_settings_that_cannot_work_are_refused_before_loading(models, tmp_path, capsys, devices, init_args, extra,
                                                              message):
    data = prompts_file(tmp_path / "p.jsonl", 2)
    out = tmp_path / "out"
    code = lgen_here(*here(models["llama"], data, out, *strategy(tmp_path, **init_args), "--trainer.devices",
                           str(devices), *extra))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before the output directory was touched


def test_a_model_without_a_plan_is_refused(bpe_tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_embd=32, n_layer=1, n_head=4)).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    data = prompts_file(tmp_path / "p.jsonl", 2)
    assert lgen_here(*here(folder, data, tmp_path / "out", *tensor_parallel(tmp_path, 2))) == 2
    assert "'gpt2' has no tensor-parallel plan" in capsys.readouterr().err


def test_an_adapter_is_refused(models, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(models["llama"]),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    data = prompts_file(tmp_path / "p.jsonl", 2)
    assert lgen_here(*here(models["llama"], data, tmp_path / "out", "--model.adapter_name_or_path", str(adapter),
                           *tensor_parallel(tmp_path, 2))) == 2
    assert "peft adapters are not sharded" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a machine with a GPU")
def test_cpu_processes_on_a_gpu_machine_are_refused(models, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 2)
    assert lgen_here(*here(models["llama"], data, tmp_path / "out", *tensor_parallel(tmp_path, 2))) == 2
    assert "tensor parallelism over cpu processes on a machine with a cuda" in capsys.readouterr().err


def test_a_sigterm_stops_the_group_together_and_it_resumes(models, tmp_path):
    """SIGTERM to rank 1 alone (rank 0 never gets it): the ranks agree at each look whether a stop
    was asked for, so rank 1 does not wind down while rank 0 waits for it in an all-reduce."""
    import os
    import signal
    import time

    data = prompts_file(tmp_path / "p.jsonl", 60)
    long_rows = ["--model.max_new_tokens", "48", "--model.use_brace_matching", "false", "--data.max_batch_tokens",
                 "2000"]
    lgen(base(models["llama"], data, tmp_path / "one", *long_rows))
    out = tmp_path / "out"
    run = [sys.executable, "-m", "lgen", *base(models["llama"], data, out, *long_rows, *tensor_parallel(tmp_path, 2))]
    proc = subprocess.Popen(run, env=dict(env(), CUDA_VISIBLE_DEVICES=""), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stop = time.monotonic() + 300
        while not any(p.stat().st_size for p in out.glob("*.test.jsonl")) and proc.poll() is None:
            assert time.monotonic() < stop, "no record came"
            time.sleep(0.005)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        # the process Lightning started for rank 1 (a GPU machine's processes may start helpers too)
        ranks = [c for c in children if b"LOCAL_RANK=1" in Path(f"/proc/{c}/environ").read_bytes().split(b"\0")]
        assert len(ranks) == 1, children
        os.kill(int(ranks[0]), signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert "lgen: stopped by SIGTERM (" in err and "Traceback" not in err, err[-3000:]
    assert 0 < len(records(out)) < 60
    lgen(base(models["llama"], data, out, *long_rows, *tensor_parallel(tmp_path, 2)))
    assert records(out) == records(tmp_path / "one")
