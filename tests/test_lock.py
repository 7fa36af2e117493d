"""One run at a time in an output directory: a second run is refused, a crashed run's lock is not."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import base_args, lgen, prompts_file, read

from lgen.errors import OutputDirError
from lgen.output.lock import LOCK, DirectoryLock

HOLD = """
import sys, time
from lgen.output.lock import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return base_args(model, data, out, "--data.keep_columns", "null", *extra)


def test_a_second_run_on_a_directory_in_use_is_refused_and_deletes_nothing(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert lgen(*argv(tiny_model, data, out)) == 0
    before = (out / "00001-of-00001.test.jsonl").read_bytes()
    assert not (out / LOCK).exists()  # released at the end
    capsys.readouterr()
    with DirectoryLock(out):
        code = lgen(*argv(tiny_model, data, out, "--overwrite_output_dir", "true"))
        assert code == 2
        err = capsys.readouterr().err
        assert f"output_dir={str(out)!r} is in use by another lgen run (pid {os.getpid()} on " in err
        assert f"delete {out / LOCK}" in err
        assert (out / "00001-of-00001.test.jsonl").read_bytes() == before
    assert lgen(*argv(tiny_model, data, out)) == 0  # free again: a no-op


def test_the_lock_of_a_killed_process_does_not_block(tiny_model, tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert lgen(*argv(tiny_model, data, out)) == 2
        assert f"pid {holder.pid} on {socket.gethostname()}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).exists()  # SIGKILL leaves the file; the kernel dropped the flock
    assert lgen(*argv(tiny_model, data, out)) == 0
    assert len(read(out)) == 3 and not (out / LOCK).exists()


def test_a_failed_run_lets_go_of_the_lock_and_of_a_directory_it_made(tiny_model, tmp_path):
    out = tmp_path / "new"
    assert lgen(*argv(tiny_model, tmp_path / "missing.jsonl", out)) == 2
    assert not out.exists()
    with DirectoryLock(out):  # nobody holds it
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def no_flock(*args: object) -> None:
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_a_live_owner_blocks_and_a_dead_one_gives_way(tmp_path, monkeypatch):
    monkeypatch.setattr("lgen.output.lock.fcntl.flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    lock = DirectoryLock(out)
    lock.acquire()  # its owner is gone: taken over
    with pytest.raises(OutputDirError, match=f"pid {os.getpid()} on"):
        DirectoryLock(out).acquire()  # this process is alive
    lock.release()
    assert not (out / LOCK).exists()
    (out / LOCK).write_text(json.dumps({"host": "another-host", "pid": 1, "started": "x"}))
    with pytest.raises(OutputDirError, match="pid 1 on another-host"):
        DirectoryLock(out).acquire()  # another host's pid cannot be checked


@pytest.mark.slow
def test_two_runs_started_together_generate_each_record_once(tiny_model, tmp_path):
    """Whichever takes the lock generates; the other is refused, or (if it came after) finds nothing to do."""
    data = prompts_file(tmp_path / "p.jsonl", 24)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lgen", "predict", *argv(tiny_model, data, out), "--trainer.accelerator",
               "cpu", "--trainer.enable_progress_bar", "false"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert 0 in [code for code, _ in results], results
    for code, err in results:
        assert code == 0 or (code == 2 and "is in use by another lgen run" in err), err
    assert sorted(r["id"] for r in read(out)) == sorted(f"t/{i}" for i in range(24))
