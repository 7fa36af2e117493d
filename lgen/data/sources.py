"""Where rows come from: a split of a Hub dataset, a ``save_to_disk`` folder, or local files, read
with ``datasets``; a file that cannot be read fails with its name and what to fix."""

from __future__ import annotations

import codecs
import fnmatch
import glob
import importlib.util
import json
from pathlib import Path

from lgen.errors import DataError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# suffixes ``datasets`` decompresses as it reads: ``rows.jsonl.gz`` is JSON Lines
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def is_compressed(path: str | Path) -> bool:
    return Path(path).suffix.lower() in COMPRESSED


def file_format(path: str | Path) -> str | None:
    """The builder a file's suffix names, under a compression suffix: ``a.jsonl.gz`` -> ``json``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return LOCAL_FORMATS.get(suffixes[-1]) if suffixes else None


def is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def matches(pattern: str) -> list[str]:
    """The files a ``data_files`` pattern names, as ``datasets`` resolves it (``**`` spans folders)."""
    return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def covers(pattern: str, path: Path) -> bool:
    """Whether ``pattern`` (a ``data_files`` entry: a file, or a glob where ``**`` spans folders)
    names ``path``, which need not exist yet: ``dd/*/*.jsonl`` covers ``dd/out/00001-of-00001.test.jsonl``."""
    want = Path(pattern).expanduser().absolute().parts
    have = Path(path).expanduser().absolute().parts

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and fnmatch.fnmatchcase(have[j], want[i]) and match(i + 1, j + 1)

    return match(0, 0)


def local_files(data_files: list[str]) -> list[Path]:
    """The files ``data_files`` names, patterns expanded, in the order ``datasets`` reads them."""
    found: list[Path] = []
    for f in data_files:
        found += [Path(p) for p in matches(f)] if is_pattern(f) else [Path(f)]
    return found


def load_split(*, dataset_name: str | None, data_files: list[str] | None, config_name: str | None, split: str,
               revision: str | None, streaming: bool, token: str | None, sample_by: str = "line"):
    """The split as a ``datasets.Dataset`` (a stream is read whole). ``sample_by`` is how a text
    file is cut into rows: ``line``, ``paragraph`` (blank-line separated) or ``document``."""
    import datasets

    if data_files:
        ds = _load_files(dataset_name, data_files, split, streaming, sample_by)
    elif dataset_name is not None and Path(dataset_name).is_dir() and any(
            (Path(dataset_name) / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(dataset_name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"data.dataset_split={split!r} is not in {dataset_name}; splits: {sorted(ds)}")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(dataset_name, config_name, split=split, revision=revision,
                                       streaming=streaming, token=token)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
            raise DataError(f"data.dataset_name={dataset_name!r} (split {split!r}) could not be loaded: {err}") from err
    if streaming:
        ds = datasets.Dataset.from_list(list(ds))
    return ds


def _load_files(builder: str | None, files: list[str], split: str, streaming: bool, sample_by: str):
    import datasets

    for f in files:
        if not is_pattern(f) and not Path(f).is_file():
            raise DataError(f"data.data_files: {f!r} does not exist")
        if is_pattern(f) and not matches(f):
            raise DataError(f"data.data_files: {f!r} matches no file")
    builder = builder or file_format(files[0])
    if builder is None:
        raise DataError(f"data.dataset_name: cannot tell the format of {files[0]!r}; "
                        "set it to json, csv, parquet or text")
    paths = local_files(files)
    if all(p.stat().st_size == 0 for p in paths):
        raise DataError(f"the dataset in data.data_files={files} is empty: nothing to generate")
    if any(p.suffix.lower() == ".zst" for p in paths) and importlib.util.find_spec("zstandard") is None:
        raise DataError(f"data.data_files={files}: reading .zst files needs the zstandard package "
                        "(pip install zstandard), or decompress them first")
    plain = [p for p in paths if not is_compressed(p)]  # the checks read bytes; datasets decompresses the rest
    if builder in ("json", "csv", "text"):
        for p in plain:
            check_utf8(str(p))
    extra = {"sample_by": sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming, **extra)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if "corresponds to no data" in str(err):
            raise DataError(f"the dataset in data.data_files={files} is empty: nothing to generate") from err
        if builder == "json":
            for p in plain:
                check_json_lines(p)
        raise DataError(f"data.data_files={files} could not be read as {builder!r}: "
                        f"{err.__cause__ or err}; check the file or set data.dataset_name") from err


def check_json_lines(path: Path) -> None:
    """Name the first line of a JSON Lines file that is not a JSON object (1-based, as editors count).
    A file that is one JSON document (``.json``) is left to ``datasets``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
        return  # one JSON document
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"data.data_files: {path} line {number} is not valid JSON ({err.msg} at column "
                            f"{err.colno}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"data.data_files: {path} line {number} is a JSON {type(row).__name__}, not an object "
                            "({\"column\": value, ...}); each line must be one JSON object")


def check_utf8(path: str) -> None:
    """Fail with the file and byte offset instead of a decoder error deep inside ``datasets``."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(f"data.data_files: {path} is not UTF-8 (byte {offset + err.start}: "
                                f"{chunk[err.start:err.start + 4]!r}); re-encode it, e.g. iconv -f latin1 -t utf-8")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"data.data_files: {path} ends inside a UTF-8 character; re-encode it as UTF-8")
