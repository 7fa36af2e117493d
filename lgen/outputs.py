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

log = logging.getLogger(__name__)

SHARD = re.compile(r"^(\d{5})-of-(\d{5})\.(.+)\.jsonl$")
MERGED = re.compile(r"^merged\.(.+)\.jsonl$")
OWNED = {"model_config.json", "model_config_diff.json", "generation_config.json", "generation_config_diff.json",
         "adapter_config.json", "lgen_config.yaml", "fingerprint.json", "summary.json"}
RecordKey = tuple[str, tuple[int, ...], int]  # (id as JSON, part, seq index)


class OutputDirError(RuntimeError):
    """The output directory cannot be used as asked; the message says why and what to do."""


def shard_name(rank: int, world_size: int, split: str) -> str:
    return f"{rank + 1:05d}-of-{world_size:05d}.{split}.jsonl"


def is_owned(name: str) -> bool:
    return name in OWNED or bool(SHARD.match(name) or MERGED.match(name)) or name.endswith(".lgen-tmp")


def id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def record_key(record: dict[str, Any]) -> RecordKey:
    return id_key(record["id"]), tuple(record["part"]), int(record["seq"][0])


def shards(output_dir: str | Path, split: str) -> list[Path]:
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if (m := SHARD.match(p.name)) and m.group(3) == split)


def _complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each complete line: a last line without its newline was torn by a
    crash and is skipped."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if line.endswith(b"\n") and line.strip():
                yield start, line


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    for _, line in _complete_lines(path):
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


def complete_examples(keys: set[RecordKey], num_return_sequences: int) -> set[tuple[str, tuple[int, ...]]]:
    """(id, part) pairs whose every sample is written."""
    seqs: dict[tuple[str, tuple[int, ...]], set[int]] = {}
    for ident, part, seq in keys:
        seqs.setdefault((ident, part), set()).add(seq)
    return {k for k, s in seqs.items() if s >= set(range(1, num_return_sequences + 1))}


def merge(output_dir: str | Path, split: str, expected: int | None = None) -> Path:
    """Write ``merged.{split}.jsonl``: every record once, in dataset order (row, window, sample).

    Memory stays small on large outputs: a first pass keeps only each record's order and place
    (shard, byte offset); the second copies the lines in order, as they were written.
    """
    paths = shards(output_dir, split)
    index: dict[RecordKey, tuple[tuple[int, int, int], int, int, int]] = {}  # order, shard, offset, samples
    for s, path in enumerate(paths):
        for start, line in _complete_lines(path):
            r = json.loads(line)
            order = (r["meta"].get("row", 0), r["part"][0], r["seq"][0])
            index.setdefault(record_key(r), (order, s, start, r["seq"][1]))
    if not index:
        raise OutputDirError(f"no {split!r} shards with records in {output_dir}")
    missing = sorted({f"{ident} part {list(part)} seq {k}"
                      for (ident, part, _), (*_, samples) in index.items()
                      for k in range(1, samples + 1) if (ident, part, k) not in index})
    if expected is not None and len(index) < expected:
        missing.append(f"{expected - len(index)} records in all (summary.json expects {expected})")
    if missing:
        raise OutputDirError(f"cannot merge {output_dir}: missing {', '.join(missing[:10])}; "
                             "rerun the same lgen predict command to generate them")
    out = Path(output_dir) / f"merged.{split}.jsonl"
    tmp = out.with_name(out.name + ".lgen-tmp")
    sources = [open(path, "rb") for path in paths]
    try:
        with open(tmp, "wb") as f:
            for _, s, start, _ in sorted(index.values()):
                sources[s].seek(start)
                f.write(sources[s].readline())
            f.flush()
            os.fsync(f.fileno())
    finally:
        for source in sources:
            source.close()
    os.replace(tmp, out)
    log.info("merged %d records into %s", len(index), out)
    return out
