"""How fast a SIGTERM ends a run, and whether resume then gives the uninterrupted records.

Runs one job three times: uninterrupted; again with SIGTERM sent as soon as the first record is on
disk (prints the seconds from the signal to the process's end, the exit code, the records written
and the rows dropped); then the same command again (resume), whose records are compared with the
uninterrupted run's, line for line.

    python benchmarks/stop_check.py OUT_DIR                       # the quickstart on CPU (32 x 96, batch 4)
    python benchmarks/stop_check.py OUT_DIR --gpu --prompts 512 --max-new-tokens 1024 --after 8 \\
        --model OUT_DIR/rand1b --batch-size 64 --no-brace      # a long GPU job (benchmarks/random_model.py)

``--after S`` sends the signal S seconds after the run starts predicting (its shard exists) instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lgen(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lgen", "predict", *argv]


def records(out: Path) -> list[str]:
    return sorted(line for p in out.glob("*.jsonl") if not p.name.startswith("merged")
                  for line in p.read_text().splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=0, help="benchmarks/prompts.py prompts (0: the quickstart's 32)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--no-brace", action="store_true", help="no brace matching: every row runs to max_new_tokens")
    p.add_argument("--after", type=float, default=None, help="signal this many seconds into prediction")
    p.add_argument("--only-stop", action="store_true", help="only the stopped run (no uninterrupted run, no resume)")
    a, extra = p.parse_known_args()  # the rest: more lgen predict options
    a.out.mkdir(parents=True, exist_ok=True)
    data = ROOT / "configs/data/quickstart.jsonl"
    if a.prompts:
        data = a.out / "prompts.jsonl"
        subprocess.run([sys.executable, str(ROOT / "benchmarks/prompts.py"), str(data), "--prompts", str(a.prompts)],
                       check=True)
    common = ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.model_name_or_path", a.model,
              "--data.data_files", str(data), "--model.max_new_tokens", str(a.max_new_tokens),
              "--data.per_device_batch_size", str(a.batch_size), "--trainer.enable_progress_bar", "false",
              "--stop_grace_seconds", str(a.grace), "--data.keep_columns", "null",
              "--data.id_column_name", "task_id", "--data.block_size", str(512 + a.max_new_tokens)]
    if a.no_brace:
        common += ["--model.use_brace_matching", "false"]
    common += [x for x in extra if x != "--"]
    if a.gpu:
        common += ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-true", "--model.torch_dtype",
                   "bfloat16"]
    clean, stopped = a.out / "clean", a.out / "stopped"
    if not a.only_stop:
        start = time.perf_counter()
        subprocess.run(lgen(*common, "--output_dir", str(clean), "--overwrite_output_dir", "true"), check=True)
        print(f"uninterrupted: {len(records(clean))} records in {time.perf_counter() - start:.1f} s", flush=True)

    run = lgen(*common, "--output_dir", str(stopped))
    for f in stopped.glob("*"):
        f.unlink()
    proc = subprocess.Popen(run, stderr=subprocess.PIPE, text=True)
    shard = stopped / "00001-of-00001.test.jsonl"
    while not (shard.exists() and (a.after is not None or shard.stat().st_size)) and proc.poll() is None:
        time.sleep(0.005)
    if a.after is not None:
        time.sleep(a.after)
    seen = shard.read_text().count("\n") if shard.exists() else 0
    proc.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    _, err = proc.communicate()
    gone = time.perf_counter() - sent
    summary_at = (stopped / "summary.json").stat().st_mtime - (time.time() - time.perf_counter() + sent)
    summary = json.loads((stopped / "summary.json").read_text())
    print(f"SIGTERM at {seen} records on disk: exit {proc.returncode} after {gone:.2f} s; "
          f"{summary['records']} of {summary['records_expected']} records written, "
          f"{summary['runs'][-1]['rows_dropped_at_stop']} unfinished rows dropped; summary.json written "
          f"{summary_at:.2f} s after the signal", flush=True)
    if a.only_stop:
        return
    print("  " + err.strip().splitlines()[-1])
    subprocess.run(run, check=True, stderr=subprocess.DEVNULL)
    got, want = by_key(records(stopped)), by_key(records(clean))
    same = sum(got.get(k) == line for k, line in want.items())
    print(f"resumed: {sum(len(v) for v in got.values())} records, {len(got)} distinct keys; {same} of {len(want)} "
          f"records equal to the uninterrupted run's ({'identical' if got == want else 'DIFFERENT'})")


def by_key(lines: list[str]) -> dict[tuple, list[str]]:
    """Each record key's lines (more than one: a duplicate)."""
    out: dict[tuple, list[str]] = {}
    for line in lines:
        r = json.loads(line)
        out.setdefault((r["id"], tuple(r["part"]), tuple(r["seq"])), []).append(line)
    return out

if __name__ == "__main__":
    main()
