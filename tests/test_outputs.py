"""Never lose work: kill and resume, world-size changes, fingerprints, safe overwrite, merge, summary."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import prompts_file, read

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
    assert summary["records"] == summary["records_expected"] == 120 and summary["records_missing"] == 0
    assert sum(summary["finish_reasons"].values()) == 120  # the killed run's records count too
    assert summary["runs"][-1]["records_written"] == 120 - len(before)
    assert summary["runs"][-1]["examples_skipped_done"] == len(before)


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
    assert ("data.data_files: the content of 1 of 1 files changed; the directory was made from 4 rows, 4 prompts, "
            "the data now gives 5 rows, 5 prompts") in capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [
    (["--trainer.precision", "bf16-true"], "precision: was '32-true', now 'bf16-true'"),
    (["--data.keep_columns", "[lang]"], "data.keep_columns: was [], now ['lang']"),
    (["--model.engine", "generate"], "model.engine: was 'compact', now 'generate'"),
])
def test_a_resume_refuses_settings_that_change_records(tiny_model, tmp_path, capsys, extra, words):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"t/{i}", "prompt": "int f() {", "lang": "c"}) + "\n"
                            for i in range(3)))
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    capsys.readouterr()
    assert main(args(tiny_model, data, out, *extra)) == 2
    assert words in capsys.readouterr().err
    assert len(read(out)) == 3


def test_a_directory_made_before_the_new_fingerprint_entries_resumes(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    shard = out / "00001-of-00001.test.jsonl"
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:1]))  # a directory with 1 of 4 records
    old = json.loads((out / "fingerprint.json").read_text())
    for key in ("precision", "counts"):
        del old[key]
    for key in ("config", "tokenizer", "engine"):
        del old["model"][key]
    del old["data"]["keep_columns"]
    (out / "fingerprint.json").write_text(json.dumps(old))
    assert main(args(tiny_model, data, out)) == 0
    assert sorted(r["id"] for r in read(out)) == [f"t/{i}" for i in range(4)]


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
    assert main(["merge", str(out)]) == 1
    assert "cannot merge: 1 of 6 records are missing" in capsys.readouterr().err


def test_summary_is_logged_to_the_trainer_logger(tiny_model, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", 5)
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    assert main(args(tiny_model, data, out, "--trainer.logger", "CSVLogger",
                     "--trainer.logger.save_dir", str(logs))) == 0
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"][-1]
    assert summary["records"] == run["records_written"] == 5 and summary["rows_read"] == 5
    assert run["world_size"] == 1
    assert sum(summary["finish_reasons"].values()) == 5
    assert summary["generated_tokens"] == run["generated_tokens"] > 0 and run["tokens_per_second"] > 0
    assert set(run["versions"]) >= {"lgen", "torch", "transformers", "lightning"}
    metrics = next(logs.rglob("metrics.csv")).read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    assert float(row[header.index("records_written")]) == 5


def run_and_signal(argv: list[str], shard: Path, signum: int, timeout: float = 120) -> tuple[int, str, float, int]:
    """Start lgen, send ``signum`` once its first batch is on disk; returns the exit code, stderr,
    the seconds from the signal to the exit, and the lines the shard held when the signal went."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lgen", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while not (shard.exists() and shard.read_bytes().count(b"\n") >= 1):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"lgen finished (rc={proc.returncode}) or timed out before its first batch")
            time.sleep(0.005)
        seen = shard.read_bytes().count(b"\n")
        sent = time.perf_counter()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err, time.perf_counter() - sent, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_next_batch_and_the_same_command_resumes(tiny_model, tmp_path, signum):
    data = prompts_file(tmp_path / "p.jsonl", 120)
    out = tmp_path / "out"
    argv = args(tiny_model, data, out, "--model.max_new_tokens", "40")  # 60 batches of 2 rows
    code, err, seconds, seen = run_and_signal(argv, out / SHARD, signum)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-2000:]
    assert f"lgen: stopped by {name} (" in err and "run the same command again to resume" in err
    assert "Received SIG" not in err  # Lightning's own line: lgen says it once
    written = lines(out)
    # the call in flight, and at most one more, write the rows that finish in them: with continuous
    # batching on a CPU up to a pool's 32 rows (a stream's pool drains before the next one starts)
    assert seen <= len(written) <= seen + 32 + 2 * 2 < 120
    assert seconds < 30  # a batch takes well under a second here; startup is not counted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == len(written) and summary["records_missing"] == 120 - len(written)
    assert summary["runs"][-1]["status"] == f"interrupted (stopped by {name})"
    result = subprocess.run([sys.executable, "-m", "lgen", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in lines(out)]
    assert Counter(keys(records)).most_common(1)[0][1] == 1
    assert sorted(r["id"] for r in records) == sorted(f"t/{i}" for i in range(120))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 120 and summary["records_missing"] == 0 and len(summary["runs"]) == 2
    assert sum(summary["finish_reasons"].values()) == 120
    assert [r["records_written"] for r in summary["runs"]] == [len(written), 120 - len(written)]
    assert summary["generated_tokens"] == sum(r["generated_tokens"] for r in summary["runs"])


def test_a_no_op_resume_keeps_the_summary(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    before = json.loads((out / "summary.json").read_text())
    assert before["generated_tokens"] > 0
    capsys.readouterr()
    assert main(args(tiny_model, data, out)) == 0
    assert "nothing to generate: all 4 records are in" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == before


def test_a_no_op_resume_rebuilds_a_deleted_summary_and_merges(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    before = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    assert main(args(tiny_model, data, out, "--merge", "true")) == 0
    rebuilt = json.loads((out / "summary.json").read_text())
    for key in ("records", "records_expected", "records_missing", "finish_reasons", "rows_read"):
        assert rebuilt[key] == before[key], key
    merged = [json.loads(line) for line in (out / "merged.test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == [f"t/{i}" for i in range(4)]


def test_partial_merged_and_exported_files_go_when_records_are_added(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    shard = out / SHARD
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:3]))  # as if the run had stopped
    assert main(["merge", str(out), "--allow-partial"]) == 0
    assert main(["export", str(out), "--format", "humaneval", "--allow-partial"]) == 0
    stale = sorted(p.name for p in out.iterdir() if p.name.startswith(("merged", "humaneval")))
    assert len(stale) == 2, stale
    capsys.readouterr()
    assert main(args(tiny_model, data, out)) == 0
    assert "removed" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if p.name.startswith(("merged", "humaneval"))]
    assert len(lines(out)) == 6


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tiny_model, tmp_path, capsys, monkeypatch):
    data = prompts_file(tmp_path / "p.jsonl", 6)
    clean = tmp_path / "clean"
    assert main(args(tiny_model, data, clean)) == 0
    out = tmp_path / "out"
    fsync, calls = os.fsync, []

    def full(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 3:  # the first batch and the first files are written
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr("lgen.output.writer.os.fsync", full)
    capsys.readouterr()
    assert main(args(tiny_model, data, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "Traceback" not in err
    assert not list(out.glob("*.lgen-tmp"))
    monkeypatch.setattr("lgen.output.writer.os.fsync", fsync)
    assert main(args(tiny_model, data, out)) == 0
    assert sorted(lines(out)) == sorted(lines(clean))


def test_a_run_that_loses_records_does_not_exit_0(tiny_model, tmp_path, capsys, monkeypatch):
    from lgen import module
    from lgen.output import records

    build = records.build
    monkeypatch.setattr(module.records, "build", lambda *a, **kw: build(*a, **kw)[1:])  # a bug drops records
    data = prompts_file(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 1
    written = len(lines(out))
    err = capsys.readouterr().err
    assert 0 < written < 6
    missing = f"lgen: error: {6 - written} records of this run's batches were not written ({written} of 6 records"
    assert missing in err


def test_merge_knows_what_is_missing_without_a_summary(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 6)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    (out / "summary.json").unlink()  # as after a SIGKILL: expected.test.json was written at the start
    shard = out / SHARD
    kept = shard.read_text().splitlines()[2:]
    shard.write_text("".join(x + "\n" for x in kept))
    capsys.readouterr()
    assert main(["merge", str(out)]) == 1
    assert "cannot merge: 2 of 6 records are missing from" in capsys.readouterr().err
    assert not (out / "merged.test.jsonl").exists()
    assert main(["merge", str(out), "--allow-partial"]) == 0
    merged = [json.loads(x) for x in (out / "merged.test.jsonl").read_text().splitlines()]
    assert [r["meta"]["row"] for r in merged] == sorted(json.loads(x)["meta"]["row"] for x in kept)


def test_truncated_prompts_are_counted(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out, "--data.block_size", "34")) == 0  # 34 - 24 new tokens: 10-token prompts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts_truncated"] > 0
    err = capsys.readouterr().err
    assert err.count("prompts are longer than max_window_size=10 tokens") == 1
    assert f"{summary['prompts_truncated']} of 4 prompts" in err


def test_the_same_data_by_another_path_resumes(tiny_model, tmp_path, monkeypatch):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(args(tiny_model, data, out)) == 0
    copy = tmp_path / "elsewhere" / "prompts.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    monkeypatch.chdir(copy.parent)
    assert main(args(tiny_model, Path("prompts.jsonl"), out)) == 0  # another path, another directory
    assert len(lines(out)) == 4


def test_paths_in_a_config_file_are_read_from_its_folder(tiny_model, tmp_path, monkeypatch):
    task = tmp_path / "task"
    task.mkdir()
    prompts_file(task / "prompts.jsonl", 3)
    config = task / "task.yaml"
    config.write_text(f"model:\n  model_name_or_path: {tiny_model}\n  max_new_tokens: 8\n"
                      "data:\n  data_files: prompts.jsonl\n  text_column_name: prompt\n  mode: complete\n"
                      "output_dir: out\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the config's folder
    run = ["predict", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    assert main(run) == 0
    assert len(lines(task / "out")) == 3  # beside the config, as data_files
    assert main([*run, "--output_dir", "mine"]) == 0  # on the command line: from the current directory
    assert len(lines(elsewhere / "mine")) == 3
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config.write_text(config.read_text().replace("output_dir: out", "output_dir: ~/records"))
    assert main(run) == 0
    assert len(lines(tmp_path / "home" / "records")) == 3
