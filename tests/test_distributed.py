"""The same records on 1 process, 2 processes (gloo) and 2 simulated nodes over loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prompts_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over loopback")


def base(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--model.model_name_or_path", str(model), "--model.max_new_tokens", "16",
            "--model.use_brace_matching", "true", "--model.brace_matching_start_level", "1",
            "--data.data_files", str(data), "--data.mode", "complete", "--data.text_column_name", "prompt",
            "--data.id_column_name", "task_id", "--data.per_device_batch_size", "2", "--output_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0",
            "--data.max_batch_tokens", "120", *extra]  # pools of 3 rows: 11 prompts make 4 streams


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def lgen(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "lgen", *argv], capture_output=True, text=True, timeout=600,
                            env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def records(out: Path) -> list[str]:
    """Every line of every shard, sorted: the record set, byte for byte."""
    return sorted(line for p in out.glob("*.test.jsonl") for line in p.read_text().splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    data = prompts_file(tmp / "p.jsonl", 11)
    lgen(base(tiny_model, data, tmp / "out"))
    return data, records(tmp / "out")


def test_two_processes_give_the_one_process_records(tiny_model, one_process, tmp_path):
    data, expected = one_process
    out = tmp_path / "out"
    err = lgen(base(tiny_model, data, out, "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    assert "Initializing distributed" not in err and "[rank: " not in err, err
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["00001-of-00002.test.jsonl", "00002-of-00002.test.jsonl"]
    # 4 streams of 3, 3, 3 and 2 prompts: two to each rank, whole
    counts = [len(p.read_text().splitlines()) for p in sorted(out.glob("*.jsonl"))]
    assert sorted(counts) == [5, 6]
    assert records(out) == expected
    assert json.loads((out / "summary.json").read_text())["runs"][-1]["world_size"] == 2


def test_two_nodes_over_loopback(tiny_model, one_process, tmp_path):
    data, expected = one_process
    out = tmp_path / "out"
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                          "-m", "lgen", *base(tiny_model, data, out, "--trainer.strategy", "ddp",
                                              "--trainer.devices", "1", "--trainer.num_nodes", "2")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert records(out) == expected


@pytest.mark.slow
def test_fewer_rows_than_ranks(tiny_model, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 1)
    single, double = tmp_path / "one", tmp_path / "two"
    lgen(base(tiny_model, data, single))
    lgen(base(tiny_model, data, double, "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    assert records(double) == records(single) and len(records(single)) == 1
    assert (double / "00002-of-00002.test.jsonl").read_text() == ""


@pytest.mark.slow
def test_sampled_rows_do_not_depend_on_batch_or_ranks(tiny_model, tmp_path):
    """Each (id, part, seq) draws from its own stream: alone, in a batch of 8, or on 2 processes
    (with brace matching and a stop string ending rows at different steps)."""
    data = prompts_file(tmp_path / "p.jsonl", 8)
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": 3,
                               "eos_token_id": 2, "pad_token_id": 0}))
    runs = {"alone": ["--data.per_device_batch_size", "1"], "batch8": ["--data.per_device_batch_size", "8"],
            "two": ["--trainer.strategy", "ddp", "--trainer.devices", "2"]}
    got = {}
    for name, extra in runs.items():
        lgen(base(tiny_model, data, tmp_path / name, "--model.generation_config_file", str(gen),
                  "--model.stop_strings", '["\\n"]', *extra))
        got[name] = records(tmp_path / name)
    assert len(got["alone"]) == 24 and got["alone"] == got["batch8"] == got["two"]
    rows = [json.loads(line) for line in got["alone"]]
    assert len({r["prediction"] for r in rows}) > 12  # sampling, not greedy: the 3 samples of a prompt differ
    assert {"stop_string", "length"} <= {r["finish_reason"] for r in rows}
    other = tmp_path / "seed1"
    lgen(base(tiny_model, data, other, "--model.generation_config_file", str(gen), "--model.stop_strings", '["\\n"]',
              "--seed_everything", "1"))
    assert records(other) != got["alone"]  # the seed picks the streams


@pytest.mark.slow
def test_batch_invariant_bf16_rows_alone_and_on_two_processes(bf16_llama, tmp_path):
    """model.batch_invariant in bf16: one prompt per batch on 1 process, and batches of 4 on 2."""
    data = prompts_file(tmp_path / "p.jsonl", 8)
    mode = ["--model.batch_invariant", "true", "--model.torch_dtype", "bfloat16", "--trainer.precision", "bf16-true"]
    lgen(base(bf16_llama, data, tmp_path / "alone", *mode, "--data.per_device_batch_size", "1"))
    lgen(base(bf16_llama, data, tmp_path / "two", *mode, "--data.per_device_batch_size", "4",
              "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    assert len(records(tmp_path / "alone")) == 8 and records(tmp_path / "two") == records(tmp_path / "alone")


def test_a_finished_run_ends_its_process_group(tmp_path):
    """Each rank ends its group: rank 0 hosts the store, and a rank still in the group when it
    exits gets store errors from NCCL's watchdog after a good run."""
    from lgen.cli import _close_process_group

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    _close_process_group()
    assert not torch.distributed.is_initialized()
    _close_process_group()  # nothing to end: no error


def test_the_layout_is_read_once_from_the_strategy():
    """One object says how the ranks share the model and the work: a single process, DDP on two
    (data places, no lockstep), ZeRO-3 on two (every forward together), a tensor-parallel group
    (its stop agreed, but not lockstep: its ranks get the same rows)."""
    from lightning.pytorch import Trainer

    from lgen.hf.layout import Layout

    one = Layout.of(Trainer(accelerator="cpu", devices=1, logger=False).strategy)
    assert one == Layout() and not one.lockstep and not one.agreed_stop
    ddp = Layout.of(Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False).strategy)
    assert (ddp.world, ddp.data, ddp.tensor, ddp.lockstep, ddp.agreed_stop) == (2, 2, 1, False, False)
    assert Layout(zero3=True, world=2).lockstep and not Layout(zero3=True, world=1).lockstep
    group = Layout(tensor=2, world=2)
    assert group.agreed_stop and not group.lockstep
