"""Generation from Python: load a model once, then generate for several jobs in one process.

``lgen predict`` is one job per process. :class:`LLM` holds a :class:`GenerationModule` (the
model, its tokenizer, stop rules and sampling settings) and runs each :meth:`LLM.generate` call as
``lgen predict`` runs a job, with the same data module, engines, writer and output directory, so
the records are the same; the weights load at the first call and stay loaded for the next ones.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy
import torch
from lightning.pytorch import seed_everything

from lgen import options
from lgen.cli import quiet
from lgen.data import GenerationDataModule
from lgen.errors import ConfigError, Incomplete, Interrupted
from lgen.interrupt import GracefulStop
from lgen.module import GenerationModule
from lgen.output import directory as outputs
from lgen.output.lock import DirectoryLock
from lgen.output.merge import ordered_lines
from lgen.output.writer import JsonlWriter
from lgen.predict import make_trainer, prepare_run


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a :meth:`LLM.generate` job after the records that finished were
    written: a ``KeyboardInterrupt``, so ``except Exception`` does not swallow it; ``signum`` says
    which signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@contextmanager
def _global_random_state(seed: int) -> Iterator[None]:
    """Within the block, the global generators (``random``, NumPy, torch, CUDA) are seeded with
    ``seed``, as ``lgen predict`` seeds them (``engine: generate`` samples with torch's); after
    it, they are where the caller left them, and so is ``PL_GLOBAL_SEED``."""
    states = (random.getstate(), numpy.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    env = os.environ.get("PL_GLOBAL_SEED")
    seed_everything(seed, verbose=False)
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        if env is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = env


def _check_names(given: dict[str, Any], function: Any, where: str, *, group: str, drop: set[str] = frozenset()) -> None:
    """A named error for a keyword ``function`` does not take, with the closest that it does."""
    takes = set(inspect.signature(function).parameters) - {"self"} - set(drop)
    unknown = sorted(set(given) - takes)
    if unknown:
        hint = options.suggest(f"{group}.{unknown[0]}", [f"{group}.{k}" for k in takes])
        raise ConfigError(f"{where}: unknown option {unknown[0]!r}{hint.replace(f'{group}.', '')} "
                          f"(it takes the {group}: keys of a config)")


class LLM:
    """A model loaded once for many generation jobs.

    Args:
        model_name_or_path: a local folder, a Hub name, or an alias (``smollm2-135m-instruct``).
        max_new_tokens: tokens to generate per prompt (or ``auto``), as ``model.max_new_tokens``.
        seed: ``seed_everything``: seeds sampling (each row's stream) and ``subsamples``.
        trainer: Lightning ``Trainer`` options (``accelerator``, ``devices``, ``precision``, ...), as
            ``trainer:`` in a config; one process, so ``devices: 1`` (use ``lgen predict`` for DDP).
        **model_options: any other ``model:`` key (``use_brace_matching``, ``stop_strings``,
            ``generation_kwargs``, ``batch_invariant``, ``engine``, ...).

    Example::

        llm = LLM("smollm2-135m-instruct", max_new_tokens=96, use_brace_matching=True,
                  brace_matching_start_level=1, trainer={"accelerator": "cpu"})
        records = llm.generate(["int gcd(int a, int b) {"])
        records = llm.generate(dataset, text_column_name="prompt", id_column_name="task_id")
    """

    def __init__(self, model_name_or_path: str, *, max_new_tokens: int | str, seed: int = 0,
                 trainer: dict[str, Any] | None = None, **model_options: Any) -> None:
        self.trainer_options = {"logger": False, "enable_progress_bar": False, "devices": 1, **(trainer or {})}
        if self.trainer_options.get("devices", 1) not in (1, "1", [0]):
            raise ConfigError("LLM runs in one process: trainer devices must be 1; for several devices run "
                              "lgen predict with a config")
        self.seed = seed
        _check_names(model_options, GenerationModule.__init__, "LLM", group="model",
                     drop={"model_name_or_path", "max_new_tokens", "seed"})
        self.module = GenerationModule(model_name_or_path, max_new_tokens=max_new_tokens, seed=seed,
                                       **model_options)
        self.module.release_weights = False

    def generate(self, prompts: list[str] | Any, *, output_dir: str | Path | None = None,
                 overwrite_output_dir: bool = False, **data_options: Any) -> list[dict[str, Any]]:
        """Generate for ``prompts`` and return the records, in dataset order (row, window, sample).

        Args:
            prompts: a list of prompt strings (complete mode, ids ``0..n-1``), or a ``datasets.Dataset``
                (set ``text_column_name`` and the other ``data:`` keys as in a config).
            output_dir: where the records go, as ``lgen predict``'s (resumed when it holds some: the
                prompts count by content, a ``datasets.Dataset`` too); default: a temporary folder,
                removed after.
            overwrite_output_dir: as ``lgen predict``'s.
            **data_options: any ``data:`` key (``mode``, ``text_column_name``, ``id_column_name``,
                ``keep_columns``, ``chat_template``, ``per_device_batch_size``, ...).

        Raises :class:`JobInterrupted` (a ``KeyboardInterrupt``) on Ctrl-C or SIGTERM, once the
        records that finished are written; the same call with the same ``output_dir`` resumes.
        """
        _check_names(data_options, GenerationDataModule.__init__, "LLM.generate", group="data")
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []
        with tempfile.TemporaryDirectory(prefix="lgen-") as tmp, quiet():
            data = self._data(prompts, Path(tmp), data_options)
            out = Path(output_dir) if output_dir is not None else Path(tmp) / "out"
            try:
                return self._run(data, out, overwrite=overwrite_output_dir)
            except Interrupted as err:
                raise JobInterrupted(f"{err}; generate() again with output_dir={str(out)!r} resumes"
                                     if output_dir is not None else str(err), err.signum) from err

    def _data(self, prompts: Any, tmp: Path, options: dict[str, Any]) -> GenerationDataModule:
        linked = {"max_new_tokens": self.module.max_new_tokens, "token": self.module.token, "seed": self.seed}
        clash = sorted(set(options) & (set(linked) | {"data_files", "dataset_name"}))
        if clash:
            raise ConfigError(f"LLM.generate: {clash} come from the LLM or from prompts; leave them out")
        if isinstance(prompts, (list, tuple)):
            if not all(isinstance(p, str) for p in prompts):
                raise ConfigError("LLM.generate: prompts must be a list of strings or a datasets.Dataset")
            path = tmp / "prompts.jsonl"
            path.write_text("".join(json.dumps({"id": i, "prompt": p}, ensure_ascii=False) + "\n"
                                    for i, p in enumerate(prompts)), encoding="utf-8")
            source = {"data_files": str(path)}
            options = {"mode": "complete", "text_column_name": "prompt", "id_column_name": "id", **options}
        elif hasattr(prompts, "to_parquet"):  # a file's content, not its temporary name, is fingerprinted
            prompts.to_parquet(str(tmp / "dataset.parquet"))
            source = {"data_files": str(tmp / "dataset.parquet")}
        else:
            raise ConfigError(f"LLM.generate: prompts must be a list of strings or a datasets.Dataset, "
                              f"got {type(prompts).__name__}")
        return GenerationDataModule(**source, **options, **linked)

    def _run(self, data: GenerationDataModule, out: Path, *, overwrite: bool) -> list[dict[str, Any]]:
        outputs.check_output_dir(out, overwrite)
        with DirectoryLock(out), _global_random_state(self.seed):
            output = outputs.OutputDir(out, data.dataset_split)
            writer = JsonlWriter(output)
            trainer = make_trainer(self.trainer_options, callbacks=[writer, GracefulStop()])
            prepare_run(self.module, data, trainer, output, writer=writer, overwrite=overwrite)
            if data.todo:
                trainer.predict(self.module, datamodule=data, return_predictions=False)
                if writer.shortfall:
                    raise Incomplete(f"{writer.shortfall} records of this job were not written")
            return [json.loads(line) for line in ordered_lines(out, data.dataset_split)]
