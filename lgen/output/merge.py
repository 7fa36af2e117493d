"""``lgen merge``: one file in dataset order from the shards of every rank and run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from lgen.errors import Incomplete, OutputDirError
from lgen.output.directory import SHARD, read_expected, shard_records, shards, write_lines
from lgen.output.records import RecordKey, record_key

log = logging.getLogger(__name__)


def splits(output_dir: str | Path) -> list[str]:
    """The splits with shards in ``output_dir``."""
    d = Path(output_dir)
    if not d.is_dir():
        raise OutputDirError(f"{output_dir} does not exist" if not d.exists() else f"{output_dir} is not a directory")
    return sorted({m.group(3) for p in d.iterdir() if (m := SHARD.match(p.name))})


def ordered_lines(output_dir: str | Path, split: str, *, allow_partial: bool = False) -> Iterator[bytes]:
    """Every record of ``split`` once, in dataset order (row, window, sample), as the line written.

    The records a complete output holds come from ``expected.{split}.json``, which every run writes
    when it starts. A missing record fails, naming how many are missing, unless ``allow_partial``;
    then what there is comes out. A line that is not a record fails, naming the shard and the line
    (:func:`lgen.output.directory.parse_record`). Memory stays small on large outputs: a first pass keeps
    only each record's order and place (shard, byte offset); the second reads the lines in order.
    """
    paths = shards(output_dir, split)
    index: dict[RecordKey, tuple[tuple[int, int, int], int, int]] = {}  # order, shard, offset
    for s, path in enumerate(paths):
        for start, r in shard_records(path):
            index.setdefault(record_key(r), ((r["meta"].get("row", 0), r["part"][0], r["seq"][0]), s, start))
    if not index:
        raise OutputDirError(f"no {split!r} shards with records in {output_dir}")
    expected = read_expected(output_dir, split)
    if expected is None and not allow_partial:
        raise OutputDirError(f"cannot tell which records {output_dir} should hold: it has no expected.{split}.json "
                             "(an lgen before 0.2 wrote it); rerun the same lgen predict command, which writes it "
                             "and generates what is missing, or use what there is with --allow-partial")
    missing = [k for k in expected or () if k not in index]
    if missing:
        shown = ", ".join(f"{ident} part {list(part)} seq {seq}" for ident, part, seq in missing[:3])
        message = (f"{len(missing)} of {len(expected)} records are missing from {output_dir} ({shown}"
                   f"{', ...' if len(missing) > 3 else ''})")
        if not allow_partial:
            raise Incomplete(f"{message}; rerun the same lgen predict command to generate them, "
                             "or use what there is with --allow-partial")
        log.warning("%s; using the %d there are (--allow-partial)", message, len(index))
    sources = [open(path, "rb") for path in paths]
    try:
        for _, s, start in sorted(index.values()):
            sources[s].seek(start)
            yield sources[s].readline()
    finally:
        for source in sources:
            source.close()


def merge(output_dir: str | Path, split: str, *, allow_partial: bool = False) -> Path:
    """Write ``merged.{split}.jsonl``: every record once, in dataset order, each line as written
    (see :func:`ordered_lines`)."""
    out = Path(output_dir) / f"merged.{split}.jsonl"
    try:
        count = write_lines(out, ordered_lines(output_dir, split, allow_partial=allow_partial))
    except Incomplete as err:
        raise Incomplete(f"cannot merge: {err}") from None
    log.info("merged %d records into %s", count, out)
    return out
