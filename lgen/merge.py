"""``lgen merge``: one file in dataset order from the shards of every rank and run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lgen.errors import OutputDirError
from lgen.outputs import complete_lines, shards
from lgen.records import RecordKey, record_key

log = logging.getLogger(__name__)


def merge(output_dir: str | Path, split: str, expected: int | None = None) -> Path:
    """Write ``merged.{split}.jsonl``: every record once, in dataset order (row, window, sample).

    Memory stays small on large outputs: a first pass keeps only each record's order and place
    (shard, byte offset); the second copies the lines in order, as they were written.
    """
    paths = shards(output_dir, split)
    index: dict[RecordKey, tuple[tuple[int, int, int], int, int, int]] = {}  # order, shard, offset, samples
    for s, path in enumerate(paths):
        for start, line in complete_lines(path):
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
