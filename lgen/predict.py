"""``lgen predict``: LightningCLI set up for prediction, and the order in which the parts are built.

LightningCLI gives the config files, ``--help``, ``--print_config`` and the links between keys.
lgen runs it without subcommands (``lgen`` itself dispatches) and overrides its documented hooks:

* the parser: abbreviations off, errors raised (:func:`explain` turns them into one line), and only
  the Trainer keys that matter for prediction;
* the build order (``instantiate_classes``): the output directory is checked before anything
  loads; the trainer (hence the strategy) is known before the data is connected; the data is
  loaded, and its duplicate ids refused, before the output directory is touched; the directory is
  prepared (fingerprint, overwrite, resume) last, before any weights load.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lgen import options
from lgen.cluster import without_mpi_probe
from lgen.data import GenerationDataModule, sources
from lgen.errors import ConfigError
from lgen.hf.layout import Layout
from lgen.interrupt import GracefulStop
from lgen.module import GenerationModule
from lgen.output import directory as outputs
from lgen.output.lock import DirectoryLock
from lgen.output.merge import merge
from lgen.output.progress import GenerationProgressBar
from lgen.output.writer import JsonlWriter

log = logging.getLogger(__name__)

# Trainer settings that matter for prediction; the others (epochs, gradients, validation, ...) are hidden
TRAINER_KEYS = tuple(options.TRAINER_KEYS)
# set for every run: lgen's writer is the output, its batch sampler the plan
TRAINER_FIXED = {"enable_checkpointing": False, "enable_model_summary": False, "use_distributed_sampler": False}

# options that cannot change a record, so a resume may change them (``make_fingerprint`` has the others;
# the LINKED keys below carry the value of the key they are linked from)
_BATCHING = "how rows are batched; a row's record is the same in any batch (bf16 near-ties aside: batch_invariant)"
RECORD_NEUTRAL = {
    "model.token": "a Hub credential", "data.token": "a Hub credential",
    "model.compact_every": _BATCHING, "model.cuda_graphs": _BATCHING, "model.torch_compile": _BATCHING,
    "data.per_device_batch_size": _BATCHING, "data.max_batch_tokens": _BATCHING, "data.sort_by_length": _BATCHING,
    "data.streaming": "how the split is read, not what it holds",
    "data.overwrite_cache": "whether tokenization is redone; it gives the same ids",
    "data.preprocessing_num_workers": "processes for tokenization; they give the same ids",
    **{f"trainer.{key}": "where and how the run executes; records do not depend on it"
       for key in TRAINER_KEYS if key != "precision"},
}
# what a required or mistyped key takes, for one-line errors
ACCEPTS = {
    "model.model_name_or_path": "a local model folder, a Hub model name, or the alias smollm2-135m-instruct",
    "model.max_new_tokens": "an integer >= 1, or auto",
    "output_dir": "the directory to write the records to",
}
LINKED = options.LINKED
# keys whose relative paths, when set in a config file, are read from that file's folder
PATH_KEYS = ("data.data_files", "data.dataset_name", "data.chat_template", "model.model_name_or_path",
             "model.config_name", "model.tokenizer_name", "model.adapter_name_or_path", "model.generation_config_file")


def _seed(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class LgenCLI(LightningCLI):
    """LightningCLI for ``lgen predict``: run_gen.py's top-level keys, the links between the model
    and data sides (``max_new_tokens``, ``token``, the seed), and the build order above."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return super().init_parser(**kwargs, exit_on_error=False, allow_abbrev=False)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        hidden = {name for name in inspect.signature(Trainer.__init__).parameters if name not in TRAINER_KEYS}
        parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
                                   skip=hidden)
        parser.set_defaults({"trainer.logger": False})
        parser.add_lightning_class_args(GenerationModule, "model")
        parser.add_lightning_class_args(GenerationDataModule, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        top = {key: text for key, (text, _) in options.TOP.items()}  # lgen predict --help reads them too
        parser.add_argument("--output_dir", type=str, required=True, help=top["output_dir"])
        parser.add_argument("--overwrite_output_dir", type=bool, default=False, help=top["overwrite_output_dir"])
        parser.add_argument("--merge", type=bool, default=False, help=top["merge"])
        parser.add_argument("--stop_grace_seconds", type=float, default=5.0, help=top["stop_grace_seconds"])
        # the targets are LINKED
        parser.link_arguments("model.max_new_tokens", "data.max_new_tokens")
        parser.link_arguments("model.token", "data.token")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed)
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_seed)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(explain(str(err), parser, list(args or []))) from None
        except ValueError as err:
            raise (class_problem(err, list(args or [])) or err) from None
        self.argv = list(args or [])
        resolve_config_paths(self.config, list(args or []))

    def before_instantiate_classes(self) -> None:
        if not self.config.stop_grace_seconds >= 0:
            raise ConfigError(f"stop_grace_seconds must be >= 0, got {self.config.stop_grace_seconds}")
        outputs.check_output_dir(self.config.output_dir, self.config.overwrite_output_dir)
        self.lock = DirectoryLock(self.config.output_dir)
        if rank_zero_only.rank == 0:  # before anything is read, deleted or written there
            self.lock.acquire()

    def instantiate_classes(self) -> None:
        try:
            self._instantiate_classes()
        except BaseException:
            self.lock.release()
            raise

    def _instantiate_classes(self) -> None:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ValueError as err:
            raise (class_problem(err, self.argv) or err) from None
        cfg = self.config_init
        model: GenerationModule = cfg.model
        data: GenerationDataModule = cfg.data
        self.model, self.datamodule = model, data
        self.output = outputs.OutputDir(cfg.output_dir, data.dataset_split)
        config_text = self.parser.dump(self.config, skip_none=False)
        self.writer = JsonlWriter(self.output, config_text=config_text, merge=cfg.merge)
        self.stop = GracefulStop(grace_seconds=cfg.stop_grace_seconds)
        self.trainer = self.instantiate_trainer()
        prepare_run(model, data, self.trainer, self.output, writer=self.writer, overwrite=cfg.overwrite_output_dir)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = {**self.config_init.trainer, **kwargs}
        callbacks = config.pop("callbacks", None) or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), self.writer, self.stop]
        if config.get("enable_progress_bar", True) is not False:
            callbacks.append(GenerationProgressBar())
        try:
            return make_trainer(config, callbacks=callbacks)
        except MisconfigurationException as err:
            hint = ""
            if str(config.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
                hint = (f" (trainer.accelerator={config['accelerator']} and no GPU here); to run on CPU processes set "
                        "--trainer.accelerator cpu --trainer.devices N")
            raise ConfigError(f"trainer: {str(err).strip()}{hint}") from err

    def predict(self) -> None:
        """Run prediction; with nothing left to generate, load no weights and leave the summary as is."""
        if not self.datamodule.todo:
            log.info("nothing to generate: all %d records are in %s", len(self.output.done), self.output.path)
            if rank_zero_only.rank == 0:
                if not (self.output.path / "summary.json").is_file():
                    self.writer.rebuild_summary(self.datamodule.run_stats())
                if self.config_init.merge:
                    merge(self.output.path, self.output.split)
            self.writer.summary = self.output.summary()
            return
        self.trainer.predict(self.model, datamodule=self.datamodule, return_predictions=False)


def make_fingerprint(model: GenerationModule, data: GenerationDataModule, *, precision: str) -> dict[str, Any]:
    """Every setting that can change a record (``RECORD_NEUTRAL`` lists those that cannot), for
    ``fingerprint.json``: a resume with other values is refused. Needs ``data`` set up."""
    return {"split": data.dataset_split, "data": data.settings(), "model": model.settings(), "seed": data.seed,
            "precision": precision,
            outputs.COUNTS: {"rows": data.stats.get("rows_read"), "examples": len(data.examples or [])}}


def class_problem(err: ValueError, argv: list[str]) -> ConfigError | None:
    """One line for a class a config names that jsonargparse could not make (a logger whose package
    is missing, a callback whose defaults YAML cannot write): the key, the class, the cause, the
    fix. None for any other error, which keeps its traceback."""
    chain, cause = [], err
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(str(e) for e in chain)
    found = re.search(r"class_path[ =]'([^']+)'", text)
    if found is None:
        return None
    cls = found.group(1)
    given = [" ".join(argv)]  # where the class was named: the command line, or a config file's trainer section
    for path in options.config_files(argv):
        try:
            own = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        given += [f"--trainer.{k} {v}" for k, v in (own.get("trainer") or {}).items()]
    key = next((k for k in ("trainer.logger", "trainer.callbacks", "trainer.plugins", "trainer.profiler",
                            "trainer.strategy") for g in given if k in g and cls.rsplit(".", 1)[-1] in g), "trainer")
    root = chain[-1]
    if isinstance(root, ImportError):
        return ConfigError(f"{key}: {cls} needs a package that is not installed ({str(root).splitlines()[0]}); "
                           "install it, or choose another")
    if type(root).__name__ == "RepresenterError":
        value = root.args[1] if len(root.args) > 1 else root
        return ConfigError(f"{key}: {cls} has a default ({value!r}) that the config lgen keeps cannot hold; give the "
                           "class's init_args in a config file (e.g. interval: step)")
    return ConfigError(f"{key}: {cls}: {str(root).splitlines()[0]}")


def explain(message: str, parser: LightningArgumentParser, argv: list[str]) -> str:
    """One line for a jsonargparse error: the key, what it takes, the closest keys for a typo, or the
    config file with a YAML syntax error."""
    keys = sorted({opt[2:] for opt in parser._option_string_actions if opt.startswith("--")} - {"help"} - LINKED)
    if (m := re.match(r'Parser key "([^"]+)":', message)) and (c := re.search(
            r"Problem with given class_path '([^']+)':\s*(.+)", message)):
        key, cls, why = m.group(1), c.group(1), c.group(2).strip()
        if r := re.match(r"the following arguments are required: ([\w, ]+)", why):
            arg = r.group(1).split(",")[0].strip()
            return f"{key}.{arg} is required: {cls.rsplit('.', 1)[-1]} needs it (--{key}.{arg} VALUE, or in a config)"
        return f"{key}={cls}: {why}"
    if m := re.search(r"following arguments are required: (.+)", message):
        key = m.group(1).split(",")[0].strip()
        return f"{key} is required: {ACCEPTS.get(key, 'set it in a config file or on the command line')}"
    if m := re.match(r'Parser key "([^"]+)":', message):
        key = m.group(1)
        given = re.search(r"(?:Given|Got) value: (.*)", message)
        value = given.group(1).strip() if given else None
        if value in (None, "None", "null"):
            return f"{key} is required: {ACCEPTS.get(key, 'set it in a config file or on the command line')}"
        return f"{key}={value!r} is not valid: expected {ACCEPTS.get(key) or _expected(message)}"
    unknown = re.findall(r"unrecognized arguments: (\S+)", message) + [
        f"{group}.{key}" if group else key
        for group, key in re.findall(r"(?:Group '([^']+)' )?does not accept (?:option|nested key) '([^']+)'", message)]
    if unknown:
        key = unknown[0].lstrip("-").split("=")[0]
        return f"unknown key {key}{options.suggest(key, keys)} (lgen predict --help lists every key)"
    if message.startswith("Problems parsing config"):
        for path in options.config_files(argv):
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as err:
                return f"{path} is not valid YAML: {' '.join(str(err).split())}"
            except OSError as err:
                return f"--config {path}: {err.strerror}"
    return " ".join(message.split())


def _expected(message: str) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}
    found = [names.get(t, t) for t in re.findall(r"Expected a <class '(\w+)'>", message)]
    found += [f"one of {lits}" for lits in re.findall(r"Literal\[([^\]]+)\]", message)]
    return ", or ".join(dict.fromkeys(found)) or "another value"


def make_trainer(options: dict[str, Any], *, callbacks: list[Any]) -> Trainer:
    """The Trainer of a run, for ``lgen predict`` and :class:`lgen.api.LLM` alike: ``options`` (a
    config's ``trainer:``), what every lgen run fixes, and the cluster environment Lightning would
    pick, found without starting MPI (:mod:`lgen.cluster`)."""
    plugins = without_mpi_probe(options.get("plugins"), options.get("strategy"))
    return Trainer(**{**options, "plugins": plugins}, **TRAINER_FIXED, callbacks=callbacks)


def prepare_run(model: GenerationModule, data: GenerationDataModule, trainer: Trainer, output: outputs.OutputDir, *,
                writer: JsonlWriter, overwrite: bool) -> None:
    """What a run does before any weights load, in this order: the strategy is checked, the data
    learns the tokenizer and limits and is read and planned, the output directory is checked
    against the fingerprint, which leaves the data only the records still missing, and the writer
    learns what it writes beside the records."""
    if trainer.limit_predict_batches != 1.0:
        raise ConfigError(f"trainer.limit_predict_batches={trainer.limit_predict_batches} is not supported: lgen's "
                          "batches are groups of prompts joining rows that are still decoding, and a cut would "
                          "leave them unfinished; to run part of a dataset give a smaller data file (the same "
                          "output_dir resumes with the whole one later)")
    for pattern in data.data_files or []:
        own = output.path / outputs.shard_name(0, 1, output.split)
        if sources.covers(pattern, own):
            raise ConfigError(f"output_dir={str(output.path)!r} is where data.data_files={pattern!r} reads: lgen's own "
                              f"records ({own.name}) would be read back as prompts; put output_dir elsewhere or "
                              "narrow the pattern")
    layout = Layout.of(trainer.strategy)
    model.check_layout(layout)
    data.connect(model.tokenizer, max_position_embeddings=getattr(model.model_config, "max_position_embeddings", None),
                 reserved_tokens=model.virtual_tokens, samples=model.num_return_sequences,
                 token_budget=model.token_budget, lockstep=layout.lockstep,
                 continuous=model.decode.continuous(lockstep=layout.lockstep))
    data.setup("predict")
    fingerprint = make_fingerprint(model, data, precision=str(trainer.precision))
    data.skip(output.prepare(fingerprint, overwrite=overwrite, rank=rank_zero_only.rank,
                             samples=model.num_return_sequences, expected=data.example_keys(),
                             rows=[ex["row"] for ex in data.examples], rows_read=data.stats["rows_read"]))
    writer.connect(files=model.config_dumps(), data_stats=data.run_stats(), samples=model.num_return_sequences,
                   engine=model.engine_summary)


def resolve_config_paths(config: Namespace, argv: list[str]) -> None:
    """A relative path set in a config file is read from that file's folder, so ``lgen predict
    --config /abs/path/task.yaml`` works from any directory: ``output_dir`` always, an input path
    when it exists there (an input that exists only relative to the current directory, or a Hub
    name, is kept). A value given later on the command line is read from the current directory.
    A leading ``~`` is expanded wherever the path came from."""
    for path in options.config_files(argv):
        try:
            own = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        folder = Path(path).expanduser().resolve().parent
        for key in ("output_dir", *PATH_KEYS):
            section, _, name = key.rpartition(".")
            holder = own.get(section) if section else own
            given = holder.get(name) if isinstance(holder, dict) else None
            if given is None or config.get(key) != given:
                continue  # not set in this file, or set again after it
            always = key == "output_dir"
            config[key] = ([options.from_config_folder(folder, g, always) for g in given] if isinstance(given, list)
                           else options.from_config_folder(folder, given, always))
    for key in ("output_dir", *PATH_KEYS):
        value = config.get(key)
        config[key] = [options.expand_home(v) for v in value] if isinstance(value, list) else options.expand_home(value)
