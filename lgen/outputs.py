"""The output directory: what lgen writes there, resume, safe overwrite, fingerprints and merge.

Files lgen owns in ``output_dir``::

    00001-of-00002.test.jsonl     one shard per rank and run geometry (rank+1, world size, split)
    model_config.json, model_config_diff.json, generation_config.json,
    generation_config_diff.json, adapter_config.json       config dumps, as run_gen.py wrote them
    lgen_config.yaml              the resolved lgen config
    fingerprint.json              dataset, model and generation settings this directory was made with
    summary.json                  the run summary
    merged.test.jsonl             ``lgen merge`` output

Anything else in the directory is the user's, and lgen neither writes nor deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lgen.errors import OutputDirError
from lgen.records import ExampleKey, RecordKey, complete_examples, record_key

log = logging.getLogger(__name__)

SHARD = re.compile(r"^(\d{5})-of-(\d{5})\.(.+)\.jsonl$")
MERGED = re.compile(r"^merged\.(.+)\.jsonl$")
OWNED = {"model_config.json", "model_config_diff.json", "generation_config.json", "generation_config_diff.json",
         "adapter_config.json", "lgen_config.yaml", "fingerprint.json", "summary.json"}


def shard_name(rank: int, world_size: int, split: str) -> str:
    return f"{rank + 1:05d}-of-{world_size:05d}.{split}.jsonl"


def is_owned(name: str) -> bool:
    return name in OWNED or bool(SHARD.match(name) or MERGED.match(name)) or name.endswith(".lgen-tmp")


def shards(output_dir: str | Path, split: str) -> list[Path]:
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if (m := SHARD.match(p.name)) and m.group(3) == split)


def complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each complete line: a last line without its newline was torn by a
    crash and is skipped."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if line.endswith(b"\n") and line.strip():
                yield start, line


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    for _, line in complete_lines(path):
        yield json.loads(line)


def torn_bytes(path: Path) -> int:
    """Bytes after the last newline (a line a crash left half-written)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        back = min(size, 1 << 20)
        while True:
            f.seek(size - back)
            chunk = f.read(back)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return back - nl - 1
            if back == size:
                return size
            back = min(size, back * 2)


def drop_torn_tail(path: Path) -> int:
    n = torn_bytes(path)
    if n:
        log.warning("%s ends in a torn line (%d bytes, from an interrupted run); dropping it", path, n)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - n)
            f.flush()
            os.fsync(f.fileno())
    return n


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse unusable directories before any model loads."""
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise OutputDirError(f"output_dir={str(d)!r} is a file; give a directory")
    probe = d.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"output_dir={str(d)!r} is inside {probe}, which is a file; give a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir={str(d)!r} is not writable ({probe} denies writing); choose another")
    if d.is_dir():
        foreign = sorted(p.name for p in d.iterdir() if not is_owned(p.name))
        if foreign:
            raise OutputDirError(
                f"output_dir={str(d)!r} holds files lgen did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); lgen will not mix its output with them "
                + ("or delete them; " if overwrite else "; ") + "choose an empty or new directory")


def clear_output_dir(output_dir: str | Path) -> list[str]:
    """Delete the files lgen wrote (only those; ``check_output_dir`` refused anything else)."""
    d = Path(output_dir)
    removed = []
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if is_owned(p.name) and p.is_file():
                p.unlink()
                removed.append(p.name)
    if removed:
        log.warning("overwrite_output_dir: removed %d files lgen wrote in %s", len(removed), d)
    return removed


def check_fingerprint(output_dir: str | Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume into a directory made from other data, model or generation settings."""
    path = Path(output_dir) / "fingerprint.json"
    if not path.is_file():
        if shards(output_dir, fingerprint.get("split", "")) or any(
                SHARD.match(p.name) for p in Path(output_dir).iterdir()):
            raise OutputDirError(f"output_dir={str(output_dir)!r} has shards but no fingerprint.json, so lgen "
                                 "cannot tell what made them; set overwrite_output_dir: true or choose a new directory")
        return
    old, new = _flatten(json.loads(path.read_text())), _flatten(json.loads(json.dumps(fingerprint, default=str)))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
        raise OutputDirError(f"output_dir={str(output_dir)!r} was made with other settings ({detail}). "
                             "Resume only with the same settings; to start over set overwrite_output_dir: true, "
                             "or choose a new output_dir")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def write_json(path: Path, data: Any) -> None:
    """Write whole or not at all: a temporary file, fsync, then an atomic rename."""
    tmp = path.with_name(path.name + ".lgen-tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def done_keys(output_dir: str | Path, split: str) -> set[RecordKey]:
    """Every (id, part, seq) written by any rank of any earlier run, whatever its world size."""
    keys: set[RecordKey] = set()
    for path in shards(output_dir, split):
        keys.update(record_key(r) for r in read_records(path))
    return keys



class OutputDir:
    """One run's view of ``output_dir`` for one split: what earlier runs wrote there, and whether
    this run may add to it.

    :meth:`prepare` runs before any model loads: it refuses a directory made with other settings,
    clears it when asked (rank 0 only; with ``overwrite`` every rank starts from nothing), drops torn
    last lines, and reads the keys already written, by any rank of any earlier run.
    """

    def __init__(self, path: str | Path, split: str) -> None:
        self.path, self.split = Path(path), split
        self.done: set[RecordKey] = set()
        self.fingerprint: dict[str, Any] = {}

    def prepare(self, fingerprint: dict[str, Any], *, overwrite: bool, rank: int, samples: int) -> set[ExampleKey]:
        """Get the directory ready for this run; returns the (id, part) pairs whose every sample
        (``samples`` of them) is already written, which this run skips."""
        self.fingerprint = fingerprint
        if overwrite:
            if rank == 0:
                clear_output_dir(self.path)
            self.done = set()
            return set()
        if self.path.is_dir():
            check_fingerprint(self.path, fingerprint)
            if rank == 0:
                for shard in shards(self.path, self.split):
                    drop_torn_tail(shard)
        self.done = done_keys(self.path, self.split)
        if self.done:
            log.info("resuming: %d records already in %s are skipped", len(self.done), self.path)
        return complete_examples(self.done, samples)
