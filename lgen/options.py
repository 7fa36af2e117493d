"""The keys of ``lgen predict``, known without importing torch, Lightning or transformers.

A config mistake should cost a user a fraction of a second, not the 6-8 s those imports take. So
the option names, defaults and one-line helps of ``GenerationModule`` and ``GenerationDataModule``
are read from their source (their signatures and docstrings stay the one place they are written),
and the config files are checked against them (missing, a directory, empty, not a mapping, bad
YAML, an unknown key with the closest ones) before anything heavy is imported. The same facts make
``lgen predict --help`` short: one line per key.
"""

from __future__ import annotations

import ast
import difflib
import functools
import glob
import os
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lgen.errors import ConfigError

# Trainer settings that matter for prediction (the others are hidden), with what each is for here
TRAINER_KEYS = {
    "accelerator": "cpu, gpu (cuda) or auto",
    "strategy": "auto, ddp, deepspeed_stage_3 (configs/zero3.yaml), ...",
    "devices": "devices per node: a number, a list of indices, or auto",
    "num_nodes": "nodes (with torchrun or SLURM)",
    "precision": "32-true, bf16-true, 16-true, bf16-mixed, ...; part of the fingerprint",
    "logger": "a Lightning logger for the summary's numbers (default: none)",
    "callbacks": "extra Lightning callbacks",
    "limit_predict_batches": "not supported (a cut would leave pooled rows unfinished): give a smaller data file",
    "enable_progress_bar": "the progress bar (default: true)",
    "profiler": "a Lightning profiler: simple, advanced, pytorch",
    "plugins": "Lightning plugins (cluster environments, precision)",
    "deterministic": "torch's deterministic algorithms",
    "benchmark": "cudnn.benchmark",
    "inference_mode": "torch.inference_mode instead of no_grad (default: true)",
    "default_root_dir": "where loggers and profilers write",
}
# top-level keys, with their help and default
TOP = {
    "output_dir": ("Directory for the JSONL shards, config dumps and summary.", None),
    "overwrite_output_dir": ("Delete the files lgen wrote in output_dir before starting (never other files).",
                             "false"),
    "merge": ("Write merged.{split}.jsonl in dataset order when the run ends.", "false"),
    "stop_grace_seconds": ("After SIGTERM or Ctrl-C, how long the rows in flight may take to finish before they "
                           "are dropped (and generated again on resume).", "5.0"),
    "seed_everything": ("Lightning's seed; also seeds sampling and data.subsamples.", "0"),
}
# keys set through links (from the model side or the seed), never by the user
LINKED = {"data.max_new_tokens", "data.token", "data.seed", "model.seed"}
GROUPS = {"model": ("lgen.module", "GenerationModule"), "data": ("lgen.data.datamodule", "GenerationDataModule")}


@dataclass(frozen=True)
class Option:
    key: str
    default: str | None  # as written in the signature; None: required
    help: str


@functools.cache
def group_options(group: str) -> tuple[Option, ...]:
    """The options of ``model`` or ``data``, from the class's ``__init__`` signature and the ``Args:``
    section of its docstring, read from the source file without importing it."""
    module, name = GROUPS[group]
    # the file from the package's folder: find_spec of a submodule would import its package (lgen.data: Lightning)
    source = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = [a.arg for a in init.args.args[1:]]
    defaults = [None] * (len(args) - len(init.args.defaults)) + [ast.unparse(d) for d in init.args.defaults]
    helps = _arg_helps(ast.get_docstring(cls) or "")
    return tuple(Option(f"{group}.{a}", d, helps.get(a, "")) for a, d in zip(args, defaults)
                 if f"{group}.{a}" not in LINKED)


def _arg_helps(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section, each joined into one line."""
    helps: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    current = None
    for line in section.splitlines():
        if m := re.match(r"^    (\w+): (.*)$", line):
            current = m.group(1)
            helps[current] = m.group(2).strip()
        elif current and line.startswith("        "):
            helps[current] += " " + line.strip()
        elif line.strip():
            current = None
    return helps


def known_keys() -> set[str]:
    keys = set(TOP) | {f"trainer.{k}" for k in TRAINER_KEYS}
    for group in GROUPS:
        keys |= {o.key for o in group_options(group)}
    return keys


def from_config_folder(folder: Path, value: Any, always: bool) -> Any:
    """A relative path set in a config file, read from that file's ``folder``: always for an output,
    for an input only when it exists there (else it may be a Hub name, or relative to the current
    directory)."""
    if not isinstance(value, str) or os.path.isabs(value) or value.startswith("~"):
        return value
    candidate = os.path.normpath(folder / value)  # ../out/x from configs/ reads as out/x, not configs/../out/x
    return candidate if always or glob.glob(candidate) else value


def expand_home(value: Any) -> Any:
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def output_dir(argv: list[str]) -> str | None:
    """``output_dir`` as ``lgen predict`` resolves it from ``argv``, without the parser: the last
    value given, on the command line (read from the current directory) or in a config file (read
    from that file's folder). None when it cannot be told (a config file that cannot be read)."""
    import yaml

    found = None
    for i, arg in enumerate(argv):
        if arg in ("--output_dir", "--config", "-c") and i + 1 < len(argv):
            flag, value = arg, argv[i + 1]
        elif arg.startswith(("--output_dir=", "--config=")):
            flag, value = arg.split("=", 1)
        else:
            continue
        if flag == "--output_dir":
            found = value
            continue
        path = Path(value).expanduser()
        try:
            own = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        given = own.get("output_dir") if isinstance(own, dict) else None
        if given is not None:
            found = from_config_folder(path.resolve().parent, given, True)
    return expand_home(found) if isinstance(found, str) else None


def config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(argv: list[str]) -> None:
    """Refuse a config file that cannot be read as lgen's, naming the file and the fix."""
    import yaml

    read = []
    for name in config_files(argv):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"--config {name}: no such file")
        if path.is_dir():
            raise ConfigError(f"--config {name} is a directory; give a YAML file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"--config {name}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config {name} is not a UTF-8 text file; give a YAML file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{name} is not valid YAML: {' '.join(str(err).split())}") from None
        if data is None:
            raise ConfigError(f"--config {name} is empty; give keys such as output_dir, model: and data: "
                              "(lgen predict --help lists them)")
        if not isinstance(data, dict):
            raise ConfigError(f"--config {name} holds a YAML {type(data).__name__}, not a mapping of keys "
                              "(output_dir: ..., model: {...}, data: {...})")
        read.append((name, data))
    for name, data in read:  # every file's syntax first, then the keys
        for key in unknown_keys(data):
            raise ConfigError(f"{name}: unknown key {key}{suggest(key)} (lgen predict --help lists every key)")


def unknown_keys(data: dict[str, Any]) -> list[str]:
    """The keys of a config mapping that ``lgen predict`` does not take (groups one level deep)."""
    known = known_keys()
    groups = {"model", "data", "trainer"}
    unknown = []
    for key, value in data.items():
        key = str(key)
        if key in groups:
            if isinstance(value, dict):
                unknown += [f"{key}.{k}" for k in value if f"{key}.{k}" not in known]
        elif key not in known:
            unknown.append(key)
    return unknown


def suggest(key: str, keys: Iterable[str] | None = None) -> str:
    """``; did you mean X?`` for the closest of ``keys`` (default: every key a config file takes),
    a group's typo too (``modle`` -> ``model``)."""
    candidates = sorted(set(known_keys() if keys is None else keys) | {"model", "data", "trainer"})
    close = difflib.get_close_matches(key, candidates, n=2, cutoff=0.8)
    if not close and "." in key:  # a mistyped group: compare the rest under each group
        group, rest = key.split(".", 1)
        for real in ("model", "data", "trainer"):
            if difflib.SequenceMatcher(None, group, real).ratio() >= 0.6 and f"{real}.{rest}" in candidates:
                close = [f"{real}.{rest}"]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def help_text() -> str:
    """``lgen predict --help``: how to run it and one line per key."""
    lines = ["usage: lgen predict --config FILE [--config FILE ...] [--KEY VALUE ...] [--print_config]", "",
             "Generate completions for a dataset and write them as JSONL shards. Configs compose (later wins);",
             "--KEY VALUE on the command line overrides them. A relative path in a config file is read from that",
             "file's folder. Every key is below; the README's config reference says more.", ""]

    def add(key: str, default: str | None, text: str) -> None:
        first = re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s", text, maxsplit=1)[0] if text else ""
        tail = " (required)" if default is None else f" (default: {default})" if default else ""
        lines.extend(textwrap.wrap(f"--{key}: {first}{tail}", 110, subsequent_indent="      "))

    lines.append("top level:")
    for key, (text, default) in TOP.items():
        add(key, default, text)
    for group in GROUPS:
        lines += ["", f"{group}:"]
        for o in group_options(group):
            add(o.key, o.default, o.help)
    lines += ["", "trainer: (Lightning's own; training-only keys are hidden)"]
    for key, text in TRAINER_KEYS.items():
        add(f"trainer.{key}", "", text)
    return "\n".join(lines)
