"""Where rows come from: a split of a Hub dataset, a ``save_to_disk`` folder, or local files, read
with ``datasets``; a file that cannot be read fails with its name and what to fix."""

from __future__ import annotations

import codecs
from pathlib import Path

from lgen.errors import DataError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_split(*, dataset_name: str | None, data_files: list[str] | None, config_name: str | None, split: str,
               revision: str | None, streaming: bool, token: str | None):
    """The split as a ``datasets.Dataset`` (a stream is read whole)."""
    import datasets

    if data_files:
        ds = _load_files(dataset_name, data_files, split, streaming)
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


def _load_files(builder: str | None, files: list[str], split: str, streaming: bool):
    import datasets

    for f in files:
        if not any(ch in f for ch in "*?[") and not Path(f).is_file():
            raise DataError(f"data.data_files: {f!r} does not exist")
    builder = builder or LOCAL_FORMATS.get(Path(files[0]).suffix.lower())
    if builder is None:
        raise DataError(f"data.dataset_name: cannot tell the format of {files[0]!r}; "
                        "set it to json, csv, parquet or text")
    if builder in ("json", "csv", "text"):
        for f in files:
            if Path(f).is_file():
                check_utf8(f)
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if "corresponds to no data" in str(err):
            raise DataError(f"the dataset in data.data_files={files} is empty: nothing to generate") from err
        raise DataError(f"data.data_files={files} could not be read as {builder!r}: "
                        f"{err.__cause__ or err}; check the file or set data.dataset_name") from err


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
