"""The output directory: what lgen writes there, resume, safe overwrite, fingerprints and merge.

Files lgen owns in ``output_dir``::

    00001-of-00002.test.jsonl     one shard per rank and run geometry (rank+1, world size, split)
    model_config.json, model_config_diff.json, generation_config.json,
    generation_config_diff.json, adapter_config.json       config dumps, as run_gen.py wrote them
    lgen_config.yaml              the resolved lgen config
    fingerprint.json              dataset, model and generation settings this directory was made with
    expected.test.json            every (id, part) of the split, the samples of each and its source
                                  row: what a complete output holds (written when a run starts; merge
                                  and export read it)
    summary.json                  totals for the directory, and each run's own figures
    lgen.lock                     held while a run lives, so that one run at a time writes here
    receipt.json                  what the command that completed the directory read and wrote, so
                                  the same command again ends at once (:mod:`lgen.output.receipt`)
    merged.test.jsonl             ``lgen merge`` output
    humaneval.test.jsonl, bigcode.test.json                ``lgen export`` output

Anything else in the directory is the user's, and lgen neither writes nor deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lgen.errors import DISK_FULL, OutputDirError
from lgen.output.lock import LOCK
from lgen.output.receipt import NAME as RECEIPT
from lgen.output.records import ExampleKey, RecordKey, complete_examples, id_key, record_key

log = logging.getLogger(__name__)

SHARD = re.compile(r"^(\d{5})-of-(\d{5})\.(.+)\.jsonl$")
MERGED = re.compile(r"^merged\.(.+)\.jsonl$")
EXPECTED = re.compile(r"^expected\.(.+)\.json$")
RUNNING = re.compile(r"^(\d{5})-of-(\d{5})\.(.+)\.run\.json$")  # a writing rank's figures while a run lasts
EXPORTED = re.compile(r"^(humaneval\.(.+)\.jsonl|bigcode\.(.+)\.json)$")
RECORD_FIELDS = ("id", "part", "seq", "finish_reason", "meta")  # what readers of a shard rely on
OWNED = {"model_config.json", "model_config_diff.json", "generation_config.json", "generation_config_diff.json",
         "adapter_config.json", "lgen_config.yaml", "fingerprint.json", "summary.json", LOCK, RECEIPT}


def data_place(trainer: Any) -> tuple[int, int]:
    """(this rank's place, how many places) among the ranks that get rows of their own, as the
    strategy deals data (``distributed_sampler_kwargs``): one shard per place. Under tensor
    parallelism (``ModelParallelStrategy``) the ranks of a tensor-parallel group share a place."""
    dealt = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if dealt:
        return int(dealt["rank"]), int(dealt["num_replicas"])
    return trainer.global_rank, trainer.world_size


def writes(trainer: Any) -> bool:
    """Whether this rank writes its place's records: the first rank of each place."""
    _, places = data_place(trainer)
    return trainer.global_rank % max(1, trainer.world_size // places) == 0


def shard_name(rank: int, world_size: int, split: str) -> str:
    return f"{rank + 1:05d}-of-{world_size:05d}.{split}.jsonl"


def run_file(output_dir: str | Path, place: int, places: int, split: str) -> Path:
    """Where the rank writing shard ``place`` of ``places`` keeps this run's figures while it runs
    (``shard_name`` with ``.run.json``): what rank 0 sums when a stop leaves no time for a collective."""
    return Path(output_dir) / shard_name(place, places, split).replace(".jsonl", ".run.json")


def is_owned(name: str) -> bool:
    return (name in OWNED or bool(SHARD.match(name) or MERGED.match(name) or EXPECTED.match(name)
                                  or EXPORTED.match(name) or RUNNING.match(name)) or name.endswith(".lgen-tmp"))


def shards(output_dir: str | Path, split: str) -> list[Path]:
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if (m := SHARD.match(p.name)) and m.group(3) == split)


def complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each complete line: a last line without its newline was torn by a
    crash and is skipped."""
    for start, _, line in _numbered_lines(path):
        yield start, line


def _numbered_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, line) of each complete, non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if line.endswith(b"\n") and line.strip():
                yield start, number, line


def parse_record(line: bytes, path: Path, number: int) -> dict[str, Any]:
    """Line ``number`` of shard ``path`` as a record. lgen appends whole lines and only a crash
    tears the last one (dropped), so any other line that is not a record was changed by something
    else: refused, naming the file, the line and the fix, rather than dropped without a word."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as err:
        problem = f"not UTF-8 at byte {err.start + 1}"
    except json.JSONDecodeError as err:
        problem = f"{err.msg} at column {err.pos + 1}"  # 1-based, as colno (which restarts after a newline)
    else:
        problem = _not_a_record(record)
        if problem is None:
            return record
    raise OutputDirError(f"{path} line {number} is not a record lgen wrote ({problem}); lgen only ever tears a "
                         "shard's last line, so this file was changed by something else: delete that line (its "
                         "record is generated again on resume) or set overwrite_output_dir: true")


def _not_a_record(value: Any) -> str | None:
    """What keeps a parsed line from being a record, e.g. ``"no seq"``; None for a record."""
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    missing = [f for f in RECORD_FIELDS if f not in value]
    if missing:
        return f"no {', '.join(missing)}"
    for name in ("part", "seq"):
        pair = value[name]
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(n) is int and n >= 1 for n in pair)):
            return f"{name}={json.dumps(pair)} is not two whole numbers from 1"
    if not isinstance(value["meta"], dict) or type(value["meta"].get("row", 0)) is not int:
        return f"meta={json.dumps(value['meta'])} is not an object with a whole-number row"
    if not isinstance(value["finish_reason"], str):
        return f"finish_reason={json.dumps(value['finish_reason'])} is not a string"
    return None


def shard_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, record) of each complete line of a shard (see :func:`parse_record`)."""
    for start, number, line in _numbered_lines(path):
        yield start, parse_record(line, path, number)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    for _, record in shard_records(path):
        yield record


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


def remove_derived(output_dir: str | Path, split: str) -> list[str]:
    """Delete ``split``'s merged and exported files: a run that adds records makes them stale (and
    the receipt, which described the directory before)."""
    d = Path(output_dir)
    (d / RECEIPT).unlink(missing_ok=True)
    removed = [name for name in (f"merged.{split}.jsonl", f"humaneval.{split}.jsonl", f"bigcode.{split}.json")
               if (d / name).is_file()]
    for name in removed:
        (d / name).unlink()
    if removed:
        log.warning("removed %s: they lack the records this run adds (lgen merge / lgen export makes them again)",
                    ", ".join(removed))
    return removed


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
            if is_owned(p.name) and p.is_file() and p.name != LOCK:
                p.unlink()
                removed.append(p.name)
    if removed:
        log.warning("overwrite_output_dir: removed %d files lgen wrote in %s", len(removed), d)
    return removed


# fingerprint entries added in lgen 0.3: a directory made before then has none, and resumes
ADDED = {"precision", "model.config", "model.tokenizer", "model.engine", "data.keep_columns"}
# what the data gave (rows read, prompts): shown when the data differs, never compared
COUNTS = "counts"


def has_records(output_dir: str | Path) -> bool:
    """Whether any shard, of any split, holds a complete record."""
    d = Path(output_dir)
    return d.is_dir() and any(SHARD.match(p.name) and next(complete_lines(p), None) is not None
                              for p in d.iterdir())


def check_fingerprint(output_dir: str | Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume into a directory whose records were made from other data, model or
    generation settings. A directory without records has nothing to protect: its old fingerprint
    (from a run that failed before its first batch) gives way."""
    path = Path(output_dir) / "fingerprint.json"
    if not path.is_file():
        if any(SHARD.match(p.name) for p in Path(output_dir).iterdir()):
            raise OutputDirError(f"output_dir={str(output_dir)!r} has shards but no fingerprint.json, so lgen "
                                 "cannot tell what made them; set overwrite_output_dir: true or choose a new directory")
        return
    recorded = _upgrade(json.loads(path.read_text()))
    old, new = _flatten(recorded), _flatten(json.loads(json.dumps(fingerprint, default=str)))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                    and not k.startswith(COUNTS) and not (k in ADDED and k not in old))
    if differ and has_records(output_dir):
        detail = "; ".join(_difference(k, old.get(k), new.get(k)) for k in differ)
        if any(k.startswith("data.") for k in differ):
            detail += _counts(recorded.get(COUNTS), fingerprint.get(COUNTS))
        raise OutputDirError(f"output_dir={str(output_dir)!r} was made with other settings ({detail}). "
                             "Resume only with the same settings; to start over set overwrite_output_dir: true, "
                             "or choose a new output_dir")


def _difference(key: str, old: Any, new: Any) -> str:
    if key == "data.data_files" and isinstance(old, list) and isinstance(new, list):
        changed = sum(a != b for a, b in zip(old, new))
        if len(old) != len(new):
            return f"data.data_files: was {len(old)} files, now {len(new)}"
        return f"data.data_files: the content of {changed} of {len(new)} files changed"
    return f"{key}: was {old!r}, now {new!r}"


def _counts(old: Any, new: Any) -> str:
    def said(c: Any) -> str:
        return f"{c.get('rows')} rows, {c.get('examples')} prompts" if isinstance(c, dict) else "unknown"

    return f"; the directory was made from {said(old)}, the data now gives {said(new)}" if new else ""


def _upgrade(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint in today's form: lgen before 0.2 keyed local files' hashes by their path."""
    files = (fingerprint.get("data") or {}).get("data_files")
    if isinstance(files, dict):
        fingerprint["data"]["data_files"] = list(files.values()) or None
    return fingerprint


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def unwritable(path: Path, err: OSError) -> OutputDirError:
    """The one-line error for a file lgen could not write (a full disk, a quota, a read-only mount)."""
    fix = "free some space" if err.errno in DISK_FULL else "make it writable"
    return OutputDirError(f"cannot write {path}: {err.strerror or err}; {fix}, then run the same command again: "
                          "every record already written is kept")


def write_json(path: Path, data: Any) -> None:
    """Write whole or not at all: a temporary file, fsync, then an atomic rename; a failed write
    leaves neither a temporary file nor a half-written ``path``."""
    tmp = path.with_name(path.name + ".lgen-tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data if isinstance(data, str) else json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise unwritable(path, err) from err


def write_lines(path: Path, lines: Iterable[bytes]) -> int:
    """Write ``lines`` whole or not at all (a temporary file, fsync, an atomic rename); returns how
    many. An error while ``lines`` are made leaves no file."""
    tmp = path.with_name(path.name + ".lgen-tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for line in lines:
                f.write(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


def scan(output_dir: str | Path, split: str) -> tuple[set[RecordKey], Counter]:
    """Every (id, part, seq) written by any rank of any earlier run, whatever its world size, and
    the count of each finish reason among them (a key written twice counts once)."""
    keys: set[RecordKey] = set()
    reasons: Counter = Counter()
    for path in shards(output_dir, split):
        for record in read_records(path):
            key = record_key(record)
            if key not in keys:
                keys.add(key)
                reasons[record["finish_reason"]] += 1
    return keys, reasons


def expected_path(output_dir: str | Path, split: str) -> Path:
    return Path(output_dir) / f"expected.{split}.json"


def write_expected(output_dir: str | Path, split: str, examples: list[ExampleKey], samples: int, *,
                   rows: list[int] | None = None, rows_read: int | None = None) -> None:
    """What a complete output of ``split`` holds: every (id, part), in dataset order, ``samples``
    each; with ``rows`` (each example's source row) and ``rows_read`` (the rows the split had,
    before the length filters), exports can keep each record at its dataset row."""
    data: dict[str, Any] = {"split": split, "samples": samples,
                            "examples": [[json.loads(ident), list(part)] for ident, part in examples]}
    if rows is not None:
        data["rows"] = list(rows)
    if rows_read is not None:
        data["rows_read"] = rows_read
    write_json(expected_path(output_dir, split), data)


@dataclass(frozen=True)
class Expected:
    """``expected.{split}.json``: what a complete output of a split holds."""

    examples: list[ExampleKey]  # every (id, part), in dataset order
    samples: int
    rows: list[int] | None = None  # each example's source row (None: an older lgen wrote the file)
    rows_read: int | None = None  # the rows of the split, before the length filters dropped any

    def keys(self) -> list[RecordKey]:
        """Every record key, in dataset order."""
        return [(ident, part, k) for ident, part in self.examples for k in range(1, self.samples + 1)]


def load_expected(output_dir: str | Path, split: str) -> Expected | None:
    """The split's :class:`Expected`; None where no run wrote the file."""
    path = expected_path(output_dir, split)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        expected = Expected([(id_key(ident), tuple(part)) for ident, part in data["examples"]], int(data["samples"]),
                            data.get("rows"), data.get("rows_read"))
    except (ValueError, KeyError, TypeError) as err:
        raise OutputDirError(f"{path} is not the file lgen wrote ({type(err).__name__}: {err}); delete it and rerun "
                             "the same lgen predict command, which writes it again") from None
    if expected.rows is not None and len(expected.rows) != len(expected.examples):
        raise OutputDirError(f"{path} lists {len(expected.rows)} rows for {len(expected.examples)} examples; delete "
                             "it and rerun the same lgen predict command, which writes it again")
    return expected


def read_expected(output_dir: str | Path, split: str) -> list[RecordKey] | None:
    """Every record key a complete output holds, in dataset order; None where no run wrote the file."""
    expected = load_expected(output_dir, split)
    return None if expected is None else expected.keys()


class OutputDir:
    """One run's view of ``output_dir`` for one split: what earlier runs wrote there, and whether
    this run may add to it.

    :meth:`prepare` runs before any weights load: it refuses a directory whose records were made
    with other settings, clears it when asked (rank 0 only; with ``overwrite`` every rank starts
    from nothing), drops torn last lines, reads the keys already written, by any rank of any
    earlier run, and (rank 0) writes ``fingerprint.json`` and ``expected.{split}.json``.
    """

    def __init__(self, path: str | Path, split: str) -> None:
        self.path, self.split = Path(path), split
        self.done: set[RecordKey] = set()
        self.reasons: Counter = Counter()  # finish reasons of the records in ``done``
        self.fingerprint: dict[str, Any] = {}
        self.expected = 0  # records a complete output holds

    def prepare(self, fingerprint: dict[str, Any], *, overwrite: bool, rank: int, samples: int,
                expected: list[ExampleKey], rows: list[int] | None = None,
                rows_read: int | None = None) -> set[ExampleKey]:
        """Get the directory ready for this run; returns the (id, part) pairs whose every sample
        (``samples`` of them) is already written, which this run skips. ``expected`` lists every
        (id, part) of the split, ``rows`` the source row of each and ``rows_read`` the rows the split
        had (for ``expected.{split}.json``)."""
        self.fingerprint = fingerprint
        self.expected = len(expected) * samples
        if overwrite:
            if rank == 0:
                clear_output_dir(self.path)
            self.done, self.reasons = set(), Counter()
        else:
            if self.path.is_dir():
                check_fingerprint(self.path, fingerprint)
                if rank == 0:
                    for shard in shards(self.path, self.split):
                        drop_torn_tail(shard)
            self.done, self.reasons = scan(self.path, self.split)
            if self.done:
                log.info("resuming: %d records already in %s are skipped", len(self.done), self.path)
        if rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / "fingerprint.json").is_file() or not has_records(self.path):
                write_json(self.path / "fingerprint.json", fingerprint)
            write_expected(self.path, self.split, expected, samples, rows=rows, rows_read=rows_read)
        return complete_examples(self.done, samples)

    def summary(self) -> dict[str, Any]:
        """The directory's ``summary.json`` ({} if none)."""
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return {}
