"""Never lose work: kill and resume, world-size changes, fingerprints, safe overwrite, merge, summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import prompts_file

from lgen.cli import main

SHARD = "00001-of-00001.test.jsonl"


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--model.model_name_or_path", str(model), "--model.max_new_tokens", "24",
            "--model.use_brace_matching", "true", "--model.brace_matching_start_level", "1",
            "--data.data_files", str(data), "--data.mode", "complete", "--data.text_column_name", "prompt",
            "--data.id_column_name", "task_id", "--data.per_device_batch_size", "2", "--output_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0", *extra]


def lines(out: Path) -> list[str]:
    found = []
    for p in sorted(out.glob("*.test.jsonl")):
        found += p.read_text().splitlines()
    return found


def keys(records: list[dict]) -> list[tuple]:
    return [(r["id"], tuple(r["part"]), tuple(r["seq"])) for r in records]


def run_and_kill(argv: list[str], shard: Path, min_lines: int, timeout: float = 120) -> int:
    """Start lgen, SIGKILL it once ``shard`` exists with at least ``min_lines`` lines; return those lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lgen", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if shard.exists():
                seen = shard.read_bytes().count(b"\n")
                if seen >= min_lines:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return seen
            if proc.poll() is not None:
                pytest.fail(f"lgen finished (rc={proc.returncode}) before it could be killed")
            time.sleep(0.005)
        pytest.fail("timed out waiting for the shard")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("min_lines", [1, 0])
def test_sigkill_then_rerun_writes_every_key_once(tiny_model, tmp_path, min_lines):
    data = prompts_file(tmp_path / "p.jsonl", 120)
    out = tmp_path / "out"
    argv = args(tiny_model, data, out)
    seen = run_and_kill(argv, out / SHARD, min_lines)
    before = lines(out)
    assert len(before) < 120
    if min_lines == 0:
        assert seen == 0  # killed inside the very first batch
    for line in before:
        json.loads(line)
    with open(out / SHARD, "ab") as f:  # what a kill in the middle of a write would leave
        f.write(b'{"id": "t/99", "part": [1')
    result = subprocess.run([sys.executable, "-m", "lgen", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torn line (25 bytes" in result.stderr
    records = [json.loads(line) for line in lines(out)]
    assert Counter(keys(records)).most_common(1)[0][1] == 1
    assert sorted(r["id"] for r in records) == sorted(f"t/{i}" for i in range(120))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_written"] == 120 - len(before)
    assert summary["examples_skipped_done"] == len(before)


def test_resume_after_world_size_change(tiny_model, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 12)
    full = tmp_path / "full"
    assert main(args(tiny_model, data, full)) == 0
    reference = {r["id"]: r for r in map(json.loads, lines(full))}
    # the same directory as two ranks of an earlier run would have left it, with 5 records missing
    out = tmp_path / "out"
    out.mkdir()
    for name in ("fingerprint.json", "model_config.json"):
        (out / name).write_text((full / name).read_text())
    kept = [line for line in lines(full) if json.loads(line)["id"] not in {"t/1", "t/4", "t/5", "t/8", "t/11"}]
    (out / "00001-of-00002.test.jsonl").write_text("".join(x + "\n" for x in kept[::2]))
    (out / "00002-of-00002.test.jsonl").write_text("".join(x + "\n" for x in kept[1::2]))
    assert main(args(tiny_model, data, out)) == 0
    new = [json.loads(x) for x in (out / SHARD).read_text().splitlines()]
    assert sorted(r["id"] for r in new) == ["t/1", "t/11", "t/4", "t/5", "t/8"]
    for r in new:
        assert r == reference[r["id"]]
    assert main(args(tiny_model, data, out)) == 0  # nothing left: nothing written
    assert len((out / SHARD).read_text().splitlines()) == 5
    assert main(["merge", str(out)]) == 0
    merged = [json.loads(x) for x in (out / "merged.test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == [f"t/{i}" for i in range(12)]
    assert merged == [reference[f"t/{i}"] for i in range(12)]


def test_fingerprint_refuses_other_settings(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    capsys.readouterr()
    assert main(args(tiny_model, data, out, "--model.max_new_tokens", "9")) == 2
    err = capsys.readouterr().err
    assert "was made with other settings (" in err and "model.max_new_tokens: was 24, now 9" in err
    assert "overwrite_output_dir: true" in err
    (data.parent / "p.jsonl").write_text((data.parent / "p.jsonl").read_text() + json.dumps(
        {"task_id": "t/x", "prompt": "int z() {"}) + "\n")
    assert main(args(tiny_model, data, out)) == 2
    assert "data.data_files." in capsys.readouterr().err


def test_overwrite_removes_only_lgen_files(tiny_model, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    (out / "00003-of-00004.test.jsonl").write_text('{"id": "old"}\n')
    assert main(args(tiny_model, data, out, "--model.max_new_tokens", "9", "--overwrite_output_dir", "true")) == 0
    assert not (out / "00003-of-00004.test.jsonl").exists()
    assert len(lines(out)) == 4
    assert json.loads((out / "fingerprint.json").read_text())["model"]["max_new_tokens"] == 9


def test_merge_reports_missing_records(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out, "--merge", "true")) == 0
    assert [json.loads(x)["id"] for x in (out / "merged.test.jsonl").read_text().splitlines()] == [
        f"t/{i}" for i in range(6)]
    shard = out / SHARD
    shard.write_text("".join(x + "\n" for x in shard.read_text().splitlines()[1:]))
    assert main(["merge", str(out)]) == 2
    assert "missing 1 records in all (summary.json expects 6)" in capsys.readouterr().err


def test_summary_is_logged_to_the_trainer_logger(tiny_model, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 5)
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    assert main(args(tiny_model, data, out, "--trainer.logger", "CSVLogger",
                     "--trainer.logger.save_dir", str(logs))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_written"] == 5 and summary["rows_read"] == 5 and summary["world_size"] == 1
    assert sum(summary["finish_reasons"].values()) == 5
    assert summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0
    assert set(summary["versions"]) >= {"lgen", "torch", "transformers", "lightning"}
    metrics = next(logs.rglob("metrics.csv")).read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    assert float(row[header.index("records_written")]) == 5
