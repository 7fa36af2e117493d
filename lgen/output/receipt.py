"""A finished run's receipt: the next identical command sees there is nothing to do without
importing Lightning, transformers or ``datasets``.

A no-op resume through the whole CLI costs seconds of imports, a tokenizer and config load and a
pass over the data, only to find every record on disk. ``lgen predict`` writes ``receipt.json``
when it leaves a directory complete. It holds what decided the run: the command line, the text of
its config files, the folder it ran from and the versions of lgen and its libraries (hashed), and
the size, modification time and (up to 4 MiB) content hash of every local input (data files,
model, tokenizer, config and adapter folders, the generation config and chat template files) and
of every file in the output directory. A later command takes the short way only when all of these
are as they were and no run holds the directory's lock; anything else (another option, an edited
or added input, a deleted record, a Hub name that cannot be checked this way) goes the normal way,
which checks the directory's fingerprint itself.

This module imports only the standard library and :mod:`lgen.output.lock`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from lgen.output.lock import LOCK, held

NAME = "receipt.json"
HASHED = 4 << 20  # files up to this size are compared by content too
PACKAGES = ("lgen", "torch", "transformers", "tokenizers", "datasets", "lightning", "jsonargparse", "peft")
# data.dataset_name values that name a datasets builder for local files, not a dataset
BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
# input keys and how a value that is not a local path is read: "inline" (part of the config text),
# "builder" (a datasets builder name), or anything else: not checkable, so no receipt
INPUT_KEYS = {"data.data_files": "files", "data.dataset_name": "builder", "data.chat_template": "inline",
              "model.model_name_or_path": "model", "model.config_name": "model", "model.tokenizer_name": "model",
              "model.adapter_name_or_path": "model", "model.generation_config_file": "files"}


def invocation(argv: list[str], configs: list[str]) -> str:
    """A hash of what the command says: its arguments, the text of its config files (``configs``),
    the folder it runs from (relative paths), and the versions of lgen and of the libraries that
    tokenize and generate."""
    texts = {}
    for name in configs:
        try:
            texts[name] = Path(name).expanduser().read_text()
        except OSError:
            texts[name] = None
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    text = json.dumps({"argv": argv, "configs": texts, "cwd": os.getcwd(), "versions": versions}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def inputs(values: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any] | None:
    """The state of every local input named in ``values`` (resolved config keys), or None when one
    cannot be checked from the file system (a Hub name). ``aliases``: the file each model alias
    in ``values`` stands for."""
    state: dict[str, Any] = {}
    for key, kind in INPUT_KEYS.items():
        value = values.get(key)
        items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for item in items:
            if item is None:
                continue
            item = str(item)
            item = aliases.get(item, item)
            if os.path.exists(item):
                state[os.path.abspath(item)] = _files(item)
            elif kind == "files" and glob.has_magic(item):
                matches = sorted(glob.glob(item))
                if not matches:
                    return None
                state[f"glob:{os.path.abspath(item)}"] = [[m, _files(m)] for m in matches]
            elif kind == "inline" or (kind == "builder" and item in BUILDERS):
                continue
            else:
                return None
    return state


def directory(path: str | Path) -> list[list[Any]]:
    """Every file of the output directory but the receipt and the lock, with its size and time."""
    root = Path(path)
    return [[p.name, *_stat(p)] for p in sorted(root.iterdir()) if p.is_file() and p.name not in (NAME, LOCK)]


def write(path: str | Path, *, argv: list[str], configs: list[str], values: dict[str, Any],
          aliases: dict[str, str]) -> None:
    """Write the receipt of a complete directory (last, once nothing more is written there); none
    for inputs it cannot check."""
    state = inputs(values, aliases)
    target = Path(path) / NAME
    if state is None:
        target.unlink(missing_ok=True)
        return
    receipt = {"invocation": invocation(argv, configs), "inputs": state, "directory": directory(path)}
    staging = target.with_name(f"{NAME}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(receipt))
    staging.replace(target)


def nothing_to_do(argv: list[str], configs: list[str], output_dir: str | None) -> tuple[Path, dict[str, Any]] | None:
    """(``output_dir``, its summary) when ``argv`` (with config files ``configs``) is the command
    that last completed it and nothing it read or wrote has changed since; None otherwise (the
    normal way decides)."""
    if output_dir is None:
        return None
    path = Path(output_dir)
    try:
        receipt = json.loads((path / NAME).read_text())
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if receipt.get("invocation") != invocation(argv, configs) or summary.get("records_missing"):
        return None
    if held(path) or receipt.get("directory") != directory(path):
        return None
    for name, files in receipt.get("inputs", {}).items():
        if name.startswith("glob:"):
            now = [[m, _files(m)] for m in sorted(glob.glob(name[5:]))]
        else:
            now = _files(name) if os.path.exists(name) else None
        if now != files:
            return None
    return path, summary


def _stat(path: str | Path) -> list[Any]:
    """Size, modification time and, for a file of up to ``HASHED`` bytes, its SHA-256: a file
    rewritten within the file system's timestamp tick (a few ms) keeps its time."""
    st = os.stat(path)
    digest = None
    if st.st_size <= HASHED:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return [st.st_size, st.st_mtime_ns, digest]


def _files(path: str) -> list[list[Any]]:
    """A file's size and time, or those of every file under a folder (hidden folders left out)."""
    if os.path.isfile(path):
        return [["", *_stat(path)]]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(folder, name)
            found.append([os.path.relpath(full, path), *_stat(full)])
    return found
