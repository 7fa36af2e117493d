"""A stop ends a run within its grace period, whatever the pool; resume gives the uninterrupted records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import prompts_file, read

from lgen.cli import main
from lgen.output.writer import JsonlWriter

SAMPLED = ["--model.generation_kwargs", "{do_sample: true, temperature: 0.9, top_k: 40, num_return_sequences: 2}"]


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Rows that run long (no brace matching), prefilled 2 at a time into a CPU pool of 32 rows."""
    return ["predict", "--model.model_name_or_path", str(model), "--model.max_new_tokens", "48",
            "--data.data_files", str(data), "--data.mode", "complete", "--data.text_column_name", "prompt",
            "--data.id_column_name", "task_id", "--data.per_device_batch_size", "2", "--output_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0", *extra]


def signal_after_first_records(monkeypatch, signum: int = signal.SIGTERM) -> list[int]:
    """Send ``signum`` to this process right after the first batch with records is written; returns
    (once sent) how many were written by then."""
    sent: list[int] = []
    write = JsonlWriter.write_on_batch_end

    def then_signal(self, trainer, pl_module, prediction, *rest):
        write(self, trainer, pl_module, prediction, *rest)
        if not sent and self.stats["records_written"]:
            sent.append(self.stats["records_written"])
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(JsonlWriter, "write_on_batch_end", then_signal)
    return sent


@pytest.mark.parametrize("sampling", [[], SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("grace", ["0", "600"])
def test_a_stop_winds_down_and_the_same_command_gives_the_clean_records(tiny_model, tmp_path, monkeypatch, capsys,
                                                                         sampling, grace):
    data = prompts_file(tmp_path / "p.jsonl", 40)
    samples = 2 if sampling else 1
    clean = tmp_path / "clean"
    assert main(args(tiny_model, data, clean, *sampling)) == 0
    out = tmp_path / "out"
    run = args(tiny_model, data, out, *sampling, "--stop_grace_seconds", grace)
    sent = signal_after_first_records(monkeypatch)
    capsys.readouterr()
    assert main(run) == 143
    err = capsys.readouterr().err
    written = len(read(out))
    summary = json.loads((out / "summary.json").read_text())
    dropped = summary["runs"][-1]["rows_dropped_at_stop"]
    assert summary["runs"][-1]["status"] == "interrupted (stopped by SIGTERM)"
    assert sent[0] <= written < 40 * samples
    if grace == "0":  # the rows in flight are dropped at the next look
        assert dropped > 0 and f"; {dropped} unfinished rows dropped); run the same command again" in err
    else:  # time enough: every admitted row finished, and no prompt was admitted after the signal
        assert dropped == 0 and "unfinished" not in err
    assert f"lgen: stopped by SIGTERM ({written} of {40 * samples} records are in {out}" in err
    monkeypatch.undo()
    assert main(run) == 0
    assert sorted(map(json.dumps, read(out))) == sorted(map(json.dumps, read(clean)))


def test_a_signal_after_the_last_batch_still_exits_143(tiny_model, tmp_path, monkeypatch, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    end = JsonlWriter.on_predict_end

    def then_signal(self, trainer, pl_module):
        end(self, trainer, pl_module)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(JsonlWriter, "on_predict_end", then_signal)
    assert main(args(tiny_model, data, out)) == 143
    assert "lgen: stopped by SIGTERM (4 of 4 records are in" in capsys.readouterr().err
    assert len(read(out)) == 4


def test_a_negative_grace_is_refused(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 2)
    assert main(args(tiny_model, data, tmp_path / "out", "--stop_grace_seconds", "-1")) == 2
    assert "stop_grace_seconds must be >= 0, got -1.0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over loopback")
def test_a_sigterm_to_every_rank_stops_a_ddp_run_and_it_resumes(tiny_model, tmp_path):
    """As torchrun and SLURM do: the signal goes to every process of the job."""
    data = prompts_file(tmp_path / "p.jsonl", 120)
    clean = tmp_path / "clean"
    assert main(args(tiny_model, data, clean)) == 0
    out = tmp_path / "out"
    run = [sys.executable, "-m", "lgen", *args(tiny_model, data, out, "--trainer.strategy", "ddp",
                                               "--trainer.devices", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stop = time.monotonic() + 300
        while not any(p.stat().st_size for p in out.glob("*.test.jsonl")) and proc.poll() is None:
            assert time.monotonic() < stop, "no record came"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert seconds < 30, seconds  # the grace (5 s) and the end of the process group
    assert "lgen: stopped by SIGTERM (" in err and "Traceback" not in err, err[-3000:]
    written = sum(len(p.read_text().splitlines()) for p in out.glob("*.test.jsonl"))
    assert written < 120
    # every count is the sum over ranks of what is on disk, when every rank has ended
    assert f"lgen: stopped by SIGTERM ({written} of 120 records are in {out}" in err, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == summary["runs"][-1]["records_written"] == written
    assert not list(out.glob("*.run.json"))  # each rank's figures went into the summary
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = sorted(line for p in out.glob("*.test.jsonl") for line in p.read_text().splitlines())
    assert sorted(map(json.dumps, map(json.loads, got))) == sorted(map(json.dumps, read(clean)))
    total = json.loads((out / "summary.json").read_text())["generated_tokens"]
    assert total == json.loads((clean / "summary.json").read_text())["generated_tokens"]
