"""Rows to batches: the ``LightningDataModule`` that loads a split, cuts it into prompts and plans
left-padded batches.

Loading is :mod:`lgen.data.sources`, cutting rows into prompts :mod:`lgen.data.windows`, the batch plan
:mod:`lgen.data.plan`. What the data module needs from the model side (the tokenizer, length limits,
samples per prompt, a memory budget, whether ranks run in lockstep) comes through :meth:`connect`;
the examples already written by an earlier run through :meth:`skip`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lgen.batch import Batch, Group, left_pad
from lgen.data import lengths
from lgen.data.plan import PADDING, PlannedBatches, deal, plan_batches, rank_groups
from lgen.data.sources import file_format, load_split, local_files
from lgen.data.windows import Windowing, make_examples
from lgen.errors import ConfigError, DataError
from lgen.output import records
from lgen.output.directory import data_place

log = logging.getLogger(__name__)


class GenerationDataModule(LightningDataModule):
    """Loads a dataset and turns it into left-padded, length-planned prompt batches.

    Args:
        dataset_name: a Hub dataset, a folder written by ``save_to_disk``, or, with ``data_files``,
            a builder name (``json``, ``csv``, ``parquet``, ``text``; inferred from the file suffix when unset,
            also under ``.gz``, ``.bz2``, ``.xz``, ``.zst``: ``rows.jsonl.gz`` is ``json``).
        data_files: local file(s) for ``dataset_split``.
        dataset_config_name: the dataset configuration (also written to each record's ``meta.subset``).
        dataset_split: the split to generate for; it also names the output shards. With ``data_files``
            a name ``datasets`` accepts: letters, digits and underscores, parts joined by dots.
        dataset_revision: dataset version (branch, tag or commit) on the Hub.
        text_column_name: the prompt column (text); default ``text`` if present, else the first column.
            A row whose prompt is null or missing is dropped.
        reference_column_name: the reference column (text); setting it selects complete mode. A row
            whose reference is null or missing is dropped.
        id_column_name: the id column; default the row index.
        keep_columns: columns copied into every record; their values must be JSON (no bytes or dates).
        streaming: read the split as a stream (it is still materialised before planning).
        overwrite_cache: re-run tokenization instead of using the ``datasets`` cache.
        preprocessing_num_workers: processes for tokenization.
        per_device_batch_size: the most prompts prefilled together. With continuous batching (the
            compact engine, unless ZeRO-3 runs ranks in lockstep) it does not cap how many rows
            decode together: the pool does (``max_batch_tokens``; on a CPU 32 rows). Otherwise the
            most prompts in one batch.
        max_batch_tokens: the cache tokens that decode together, rows x samples x (longest prompt +
            max_new_tokens; ``block_size`` with ``max_new_tokens: auto``), so memory has a bound. An
            integer must hold one row of the longest prompt.
            ``auto`` (the default): on CUDA, what fits in the memory left after the weights (the
            least over all ranks); on a CPU, no token cap (continuous batching: 32 rows).
        block_size: cap on prompt + generation; default from the tokenizer and model.
        max_window_size: the most prompt tokens; default ``block_size - max_new_tokens``. With an
            integer ``max_new_tokens`` the two must fit in ``block_size``.
        subsamples: strided mode only: keep this many randomly chosen windows per row (seeded).
        sort_by_length: plan batches longest-first (much less padding); records are the same rows.
        sample_by: how a text file (``.txt``, or ``dataset_name: text``) is cut into rows: ``line``,
            ``paragraph`` (blank-line separated) or ``document`` (one row per file). Strided mode
            wants long rows: ``paragraph`` or ``document``.
        chat_template: complete mode for chat / instruct models: ``true`` wraps each prompt as a
            user message in the tokenizer's chat template, with the assistant's turn opened; a path
            names a Jinja template file for a tokenizer that ships none. A record's ``prompt`` is then
            the text the model saw, and ``meta.prompt_text`` the dataset's. A templated prompt longer
            than ``max_window_size`` is dropped, not cut.
        system_prompt: a system message before each prompt (with ``chat_template``).
        mode: ``complete`` (one prompt per row) or ``strided`` (windows over long texts); ``auto``
            picks complete when ``reference_column_name`` is set, as run_gen.py did. Complete mode
            without a reference column suits prompt-only sets (HumanEval-style); references are "".
        max_new_tokens: linked from ``model.max_new_tokens``.
        seed: linked from ``seed_everything``; seeds ``subsamples``.
        token: linked from ``model.token``.
    """

    def __init__(
        self,
        dataset_name: str | None = None,
        data_files: str | list[str] | None = None,
        dataset_config_name: str | None = None,
        dataset_split: str = "test",
        dataset_revision: str | None = None,
        text_column_name: str | None = None,
        reference_column_name: str | None = None,
        id_column_name: str | None = None,
        keep_columns: list[str] | None = None,
        streaming: bool = False,
        overwrite_cache: bool = False,
        preprocessing_num_workers: int | None = None,
        per_device_batch_size: int = 8,
        max_batch_tokens: int | Literal["auto"] | None = "auto",
        block_size: int | None = None,
        max_window_size: int | None = None,
        subsamples: int | None = None,
        sort_by_length: bool = True,
        sample_by: Literal["line", "paragraph", "document"] = "line",
        chat_template: bool | str = False,
        system_prompt: str | None = None,
        mode: Literal["auto", "complete", "strided"] = "auto",
        max_new_tokens: int | Literal["auto"] | None = None,
        seed: int = 0,
        token: str | None = None,
    ) -> None:
        super().__init__()
        if dataset_name is None and data_files is None:
            raise ConfigError("set data.dataset_name (a Hub dataset or a saved folder) "
                              "or data.data_files (local files)")
        if per_device_batch_size < 1:
            raise ConfigError(f"data.per_device_batch_size must be >= 1, got {per_device_batch_size}")
        if subsamples is not None and subsamples < 1:
            raise ConfigError(f"data.subsamples must be >= 1, got {subsamples}")
        if isinstance(max_batch_tokens, int) and max_batch_tokens < 1:
            raise ConfigError(f"data.max_batch_tokens must be >= 1 or auto, got {max_batch_tokens}")
        if data_files is not None and not re.fullmatch(r"\w+(\.\w+)*", dataset_split):
            # datasets' own rule for the split of local files (naming._split_re)
            raise ConfigError(f"data.dataset_split={dataset_split!r} is not a split name: with data.data_files it "
                              "may hold only letters, digits and underscores, in parts joined by dots (e.g. val_2)")
        self.dataset_name = dataset_name
        self.data_files = [data_files] if isinstance(data_files, str) else data_files
        self.dataset_config_name = dataset_config_name
        self.dataset_split = dataset_split
        self.dataset_revision = dataset_revision
        self.text_column_name = text_column_name
        self.reference_column_name = reference_column_name
        self.id_column_name = id_column_name
        self.keep_columns = list(keep_columns or [])
        self.streaming = streaming
        self.overwrite_cache = overwrite_cache
        self.preprocessing_num_workers = preprocessing_num_workers
        self.per_device_batch_size = per_device_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.batch_tokens = max_batch_tokens if isinstance(max_batch_tokens, int) else None  # resolved
        self.block_size = block_size
        self.max_window_size = max_window_size
        self.subsamples = subsamples
        self.sort_by_length = sort_by_length
        self.sample_by = sample_by
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.template: str | None = None  # the template file's text, read by connect
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.token = token
        # filled in by connect and skip
        self.tokenizer = None
        self.samples = 1
        self.token_budget: Callable[[list[int], int], int | None] | None = None
        self.lockstep = False
        self.continuous = False
        self.lengths: lengths.Lengths | None = None
        self.done: set[records.ExampleKey] = set()
        # filled in by setup
        self.examples: list[dict[str, Any]] | None = None  # every prompt of the split, in dataset order
        self.stats: dict[str, Any] = {}
        self._todo: list[dict[str, Any]] | None = None  # the examples this run generates
        self.planned_records = 0  # this rank's, once predict_dataloader planned them

    @property
    def resolved_block_size(self) -> int:
        return self.lengths.block

    @property
    def resolved_window(self) -> int:
        return self.lengths.window

    @property
    def complete_mode(self) -> bool:
        return self.mode == "complete" or (self.mode == "auto" and self.reference_column_name is not None)

    # ---- run-time facts from the model side and the output directory ------------------------------

    def connect(self, tokenizer, *, max_position_embeddings: int | None = None, reserved_tokens: int = 0,
                samples: int = 1, token_budget: Callable[[list[int], int], int | None] | None = None,
                lockstep: bool = False, continuous: bool = False) -> None:
        """Receive the tokenizer and model limits, resolve lengths, and validate them.

        ``reserved_tokens`` (prompt-tuning virtual tokens) come off ``block_size``; ``samples``
        (``num_return_sequences``) multiplies each prompt's cache tokens in ``max_batch_tokens``;
        ``token_budget(prompt lengths, fewest tokens a row holds)`` resolves ``max_batch_tokens:
        auto``; ``lockstep`` (ZeRO-3 ranks) gives every rank the same number of batches;
        ``continuous`` (:meth:`lgen.decode.DecodeSettings.continuous`) plans streams of prompt
        groups for continuous batching instead of batches.
        """
        self.tokenizer = tokenizer
        self.samples = samples
        self.token_budget = token_budget
        self.lockstep = lockstep
        self.continuous = continuous
        if self.mode == "strided" and self.reference_column_name is not None:
            raise ConfigError("data.mode: strided takes its references from the text; unset data.reference_column_name")
        if self.complete_mode and self.subsamples is not None:
            raise ConfigError(f"data.subsamples={self.subsamples} picks strided windows, and complete mode has one "
                              "prompt per row; unset data.subsamples")
        self.lengths = lengths.resolve(block_size=self.block_size, max_window_size=self.max_window_size,
                                       max_new_tokens=self.max_new_tokens, model_max_length=tokenizer.model_max_length,
                                       max_position_embeddings=max_position_embeddings,
                                       reserved_tokens=reserved_tokens,
                                       has_reference=self.reference_column_name is not None)
        self._check_chat(tokenizer)

    def _check_chat(self, tokenizer) -> None:
        if self.system_prompt is not None and not self.chat_template:
            raise ConfigError("data.system_prompt goes into the chat template: set data.chat_template: true "
                              "(or a template file) as well")
        if not self.chat_template:
            return
        if not self.complete_mode:
            raise ConfigError("data.chat_template wraps whole prompts (complete mode); strided windows of a long "
                              "text are not chat messages: unset it, or set data.mode: complete")
        if isinstance(self.chat_template, str):
            try:
                self.template = Path(self.chat_template).read_text()
            except OSError as err:
                raise ConfigError(f"data.chat_template={self.chat_template!r} is not a readable template file "
                                  f"({err.strerror}); give a Jinja file, or true for the tokenizer's own") from None
        elif not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.chat_template: true, but the tokenizer has no chat template; give a Jinja "
                              "template file instead (data.chat_template: path/to/template.jinja)")
        self._render_sample(tokenizer)

    def _render_sample(self, tokenizer) -> None:
        """Render one conversation (with the system message when there is one) now, so that a template
        that cannot parse, or refuses it (``raise_exception``, as Gemma's refuses a system role), fails
        here, naming the file and line, not as a jinja2 traceback from inside the tokenizing map."""
        from jinja2.exceptions import TemplateError, TemplateSyntaxError

        def render(system: bool) -> None:
            messages = [{"role": "system", "content": self.system_prompt}] if system else []
            tokenizer.apply_chat_template([*messages, {"role": "user", "content": "Hello"}], tokenize=False,
                                          add_generation_prompt=True, chat_template=self.template)

        try:
            render(self.system_prompt is not None)
        except TemplateError as err:
            where = "data.chat_template: true (the tokenizer's template)" if self.template is None \
                else f"data.chat_template={self.chat_template!r}"
            message = " ".join(str(err).split())
            if isinstance(err, TemplateSyntaxError):
                line = f", line {err.lineno}" if err.lineno else ""
                raise ConfigError(f"{where}{line}: the template does not parse ({message}); fix the template") from None
            fix = "fix the template, or give another one"
            if self.system_prompt is not None:
                try:
                    render(False)
                    fix = "the template takes no system message: unset data.system_prompt, or give another template"
                except TemplateError:
                    pass
            raise ConfigError(f"{where} fails on a sample conversation ({type(err).__name__}: {message}); {fix}") \
                from None

    def skip(self, done: Iterable[records.ExampleKey]) -> None:
        """Leave out the examples whose every record an earlier run wrote (resume)."""
        self.done = set(done)
        self._todo = None

    @property
    def todo(self) -> list[dict[str, Any]]:
        """The examples this run generates: all, less those :meth:`skip` named."""
        assert self.examples is not None, "setup first"
        if self._todo is None:
            self._todo = [ex for ex in self.examples if records.example_key(ex) not in self.done]
        return self._todo

    def run_stats(self) -> dict[str, Any]:
        """The data's counts for ``summary.json``: rows read and dropped, examples, prompts cut, and
        the examples an earlier run finished."""
        return {**self.stats, "examples_skipped_done": len(self.examples or []) - len(self.todo)}

    def example_keys(self) -> list[records.ExampleKey]:
        """(id, part) of every prompt of the split, in dataset order: what a complete output holds."""
        assert self.examples is not None, "setup first"
        return [records.example_key(ex) for ex in self.examples]

    def settings(self) -> dict[str, Any]:
        """The data settings that decide the prompts, for the output directory's fingerprint. Local
        files count by content (a SHA-256 each, in reading order), not by path, so the same data
        given by another path, or from another directory, resumes."""
        files = []
        for path in local_files(self.data_files or []):
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            files.append(h.hexdigest())
        settings = {
            "dataset_name": self.dataset_name, "dataset_config_name": self.dataset_config_name,
            "dataset_revision": self.dataset_revision, "data_files": files or None,
            "text_column_name": self.text_column_name, "reference_column_name": self.reference_column_name,
            "id_column_name": self.id_column_name, "mode": self.mode, "block_size": self.resolved_block_size,
            "max_window_size": self.resolved_window, "subsamples": self.subsamples,
            "keep_columns": self.keep_columns,
        }
        # absent from fingerprints written before these options existed
        if self.sample_by != "line":
            settings["sample_by"] = self.sample_by
        if self.chat_template:
            settings["chat_template"] = self.template or True
            settings["system_prompt"] = self.system_prompt
        return settings

    # ---- loading and preprocessing ---------------------------------------------------------------

    def load_raw(self):
        """The raw split, as a ``datasets.Dataset``."""
        return load_split(dataset_name=self.dataset_name, data_files=self.data_files,
                          config_name=self.dataset_config_name, split=self.dataset_split,
                          revision=self.dataset_revision, streaming=self.streaming, token=self.token,
                          sample_by=self.sample_by)

    def _check_columns(self, columns: list[str]) -> None:
        if not columns:
            raise DataError("the dataset is empty: it has no columns; check data.dataset_name / data.data_files")
        if self.text_column_name is None:
            self.text_column_name = "text" if "text" in columns else columns[0]
        for key in ("text_column_name", "reference_column_name", "id_column_name"):
            value = getattr(self, key)
            if value is not None and value not in columns:
                raise ConfigError(f"data.{key}={value!r} is not a column of the dataset; columns: {columns}")
        clash = [c for c in self.keep_columns if c in records.FIELDS]
        if clash:
            raise ConfigError(f"data.keep_columns: {clash} would overwrite record fields {list(records.FIELDS)}; "
                              "rename those columns or leave them out")
        missing = [c for c in self.keep_columns if c not in columns]
        if missing:
            raise ConfigError(f"data.keep_columns: {missing} are not columns of the dataset; columns: {columns}")

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("GenerationDataModule.connect(tokenizer, ...) must run before setup")
        raw = self.load_raw()
        self._check_columns(list(raw.column_names))
        if len(raw) == 0:
            raise DataError(f"the dataset split {self.dataset_split!r} is empty: nothing to generate")
        self._check_text(raw)
        windowing = Windowing(self.complete_mode, self.text_column_name, self.reference_column_name,
                              self.id_column_name, tuple(self.keep_columns), self.resolved_block_size,
                              self.resolved_window, self.max_new_tokens, self.subsamples, self.seed,
                              chat=bool(self.chat_template), template=self.template, system=self.system_prompt)
        processed = raw.map(
            make_examples, batched=True, with_indices=True, remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "w": windowing},
            load_from_cache_file=not self.overwrite_cache, num_proc=self.preprocessing_num_workers,
            desc="tokenizing",
        )
        dropped: dict[str, list[int]] = {}  # reason -> the rows it dropped, as meta.row counts them (from 0)
        for reason, row in zip(processed["drop"], processed["row"]):
            if reason:
                dropped.setdefault(reason, []).append(row)
        drops = {reason: len(rows) for reason, rows in dropped.items()}
        for reason, rows in dropped.items():
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            log.warning("dropped %d of %d rows: %s (%s %s)", len(rows), len(raw), reason,
                        "row" if len(rows) == 1 else "rows", shown)
        if self.id_column_name is None:
            log.info("no data.id_column_name: the row index is the id")
        kept = processed.filter(lambda d: not d, input_columns="drop")
        if len(kept) == 0:
            raise DataError(f"every row was dropped ({drops}); {self._drop_hint(set(drops))}")
        examples = []
        truncated = 0
        source = raw[self.text_column_name] if self.chat_template else None
        for ex in kept:
            ex.pop("drop")
            truncated += ex.pop("truncated")
            ex["keep"] = {c: ex.pop(f"keep.{c}") for c in self.keep_columns}
            ex["meta"] = {"subset": self.dataset_config_name, "row": ex["row"]}
            if self.chat_template:  # the dataset's prompt, before the template (exports need it)
                ex["meta"]["prompt_text"] = str(source[ex["row"]])
            examples.append(ex)
        self._check_json(examples, raw.features)
        self._check_unique(examples, raw.features)
        self._check_batch_tokens(examples)
        if truncated:
            log.warning("%d of %d prompts are longer than max_window_size=%d tokens and keep only their last %d, "
                        "as run_gen.py did; raise data.block_size (or data.max_window_size) to keep more",
                        truncated, len(examples), self.resolved_window, self.resolved_window)
        self.stats = {"rows_read": len(raw), "rows_dropped": drops, "examples": len(examples),
                      "prompts_truncated": truncated}
        self.pad_example = examples[0]  # what padding batches run (a rank with no work still steps)
        self.examples = examples
        self._todo = None

    def _drop_hint(self, reasons: set[str]) -> str:
        """What to change, by why the rows were dropped."""
        hints = []
        empty = reasons & {"empty prompt", "null or missing prompt"}
        if empty:
            hints.append(f"every prompt is empty or null: check data.text_column_name={self.text_column_name!r}"
                         if empty == reasons else f"check data.text_column_name={self.text_column_name!r}")
        if "null or missing reference" in reasons:
            hints.append(f"check data.reference_column_name={self.reference_column_name!r}")
        if "prompt + reference > block_size - 1" in reasons:
            hints.append("prompt + reference must fit in block_size - 1: raise data.block_size or lower "
                         "data.max_window_size")
        if "chat prompt longer than max_window_size" in reasons:
            room = "raise data.max_window_size" if self.max_window_size is not None \
                else "raise data.block_size or lower model.max_new_tokens"
            hints.append(f"a chat prompt must fit max_window_size whole: {room}")
        if "shorter than max_window_size + max_new_tokens" in reasons:
            hint = "rows must hold at least max_window_size + max_new_tokens tokens: lower data.max_window_size"
            if self.sample_by == "line" and (self.dataset_name == "text" or any(
                    file_format(f) == "text" for f in self.data_files or [])):
                hint += ("; a text file is read one row per line, so for longer rows set data.sample_by: paragraph "
                         "(blank-line separated) or document")
            hints.append(hint)
        return "; ".join(hints)

    def _check_text(self, raw) -> None:
        """Refuse a prompt or reference column that does not hold text (lists, dicts, numbers): each
        value would be generated from as its ``str()``, ``['a', 'b']``. A column of nulls alone (an
        empty CSV column reads as float64) passes: its rows are dropped as null."""
        import datasets

        for key in ("text_column_name", "reference_column_name"):
            column = getattr(self, key)
            if column is None:
                continue
            feature = raw.features[column]
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null"):
                continue
            if all(v is None for v in raw[column]):
                continue
            if isinstance(feature, datasets.Value):
                kind = f"{feature.dtype} values"
            elif isinstance(feature, dict):
                kind = "dicts"
            elif isinstance(feature, (datasets.List, datasets.LargeList)):
                kind = f"lists ({feature})"
            else:
                kind = f"{type(feature).__name__} values"
            raise DataError(f"data.{key}={column!r} holds {kind}, not text; choose a text column "
                            f"(columns: {list(raw.column_names)}) or convert this one to strings")

    def _check_json(self, examples: list[dict[str, Any]], features) -> None:
        """Refuse ids and kept values that a JSON record cannot hold (bytes, datetime, Decimal ...)
        here, before the output directory is touched: the writer would fail on the first record,
        after ``overwrite_output_dir`` emptied it."""
        checks = [(f"data.keep_columns: column {c!r}", c, lambda ex, c=c: ex["keep"][c],
                   "leave it out of data.keep_columns, or convert the column to text first") for c in self.keep_columns]
        if self.id_column_name is not None:
            checks.insert(0, (f"data.id_column_name={self.id_column_name!r}", self.id_column_name, lambda ex: ex["id"],
                              "choose another id column, or leave data.id_column_name unset to use the row index"))
        for key, column, value, fix in checks:
            for ex in examples:
                bad = _not_json(value(ex))
                if bad is not None:
                    raise ConfigError(f"{key} holds {bad} values ({features[column]}; row {ex['row']}), which a JSON "
                                      f"record cannot hold; {fix}")

    def _check_batch_tokens(self, examples: list[dict[str, Any]]) -> None:
        """Refuse an integer ``max_batch_tokens`` below what the longest row needs: the plan would
        exceed it, one row a batch, instead of keeping memory within it."""
        if not isinstance(self.max_batch_tokens, int):
            return
        longest = max(len(ex["input_ids"]) for ex in examples)
        need = self._row_tokens(longest)
        if self.max_batch_tokens >= need:
            return
        what = (f"data.block_size ({self.resolved_block_size}, with model.max_new_tokens: auto)"
                if self.max_new_tokens == "auto" else
                f"the longest prompt + model.max_new_tokens ({longest} + {self.max_new_tokens})")
        samples = f" x {self.samples} samples" if self.samples > 1 else ""
        raise ConfigError(f"data.max_batch_tokens={self.max_batch_tokens} cannot hold one row: {what}{samples} "
                          f"= {need} cache tokens; set it to at least {need}, or auto")

    def _check_unique(self, examples: list[dict[str, Any]], features) -> None:
        """Refuse ids that name several rows: their records would share a key, and resume and the
        writer would keep only one of them."""
        counts = Counter(records.example_key(ex) for ex in examples)
        repeated = [(key, n) for key, n in counts.items() if n > 1]
        if repeated:
            shown = ", ".join(f"{ident}{'' if part == (1, 1) else f' part {list(part)}'} ({n} times)"
                              for (ident, part), n in repeated[:3])
            mixed = (self.id_column_name is not None and type(features[self.id_column_name]).__name__ == "Json")
            why = (" (the column mixes value types, which datasets reads as JSON values: 1 and \"1\" become the same "
                   "id)" if mixed else "")
            raise DataError(f"data.id_column_name={self.id_column_name!r} does not identify the rows: "
                            f"{len(repeated)} ids appear more than once ({shown}{', ...' if len(repeated) > 3 else ''})"
                            f"{why}; choose a column whose values are unique, or leave data.id_column_name unset to "
                            "use the row index")

    # ---- planning and loading --------------------------------------------------------------------

    def _row_tokens(self, longest: int) -> int:
        """One prompt's cache, all its samples."""
        return self.samples * self.lengths.row_span(longest)

    def plan(self) -> list[list[int]]:
        """All batches, as lists of indices into :attr:`todo`, in the order they run. Depends only on
        the data and the settings."""
        return plan_batches([len(ex["input_ids"]) for ex in self.todo], batch_size=self.per_device_batch_size,
                         batch_tokens=self.batch_tokens, row_tokens=self._row_tokens,
                         sort_by_length=self.sort_by_length)

    def rank_batches(self, rank: int, world_size: int) -> list[list[int]]:
        """This rank's whole batches (see :func:`lgen.data.plan.deal`)."""
        return deal(self.plan(), rank, world_size, equalize=self.lockstep)

    def rank_groups(self, rank: int, world_size: int) -> list[list[tuple[int, Group | None]]]:
        """This rank's prompt groups, stream after stream, each index with its :class:`Group`
        (see :func:`lgen.data.plan.rank_groups`)."""
        return rank_groups([len(ex["input_ids"]) for ex in self.todo], self.lengths, samples=self.samples,
                           batch_tokens=self.batch_tokens, batch_size=self.per_device_batch_size, rank=rank,
                           world_size=world_size)

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.max_batch_tokens == "auto" and self.token_budget is not None:
            lengths = [len(ex["input_ids"]) for ex in self.todo] or [1]
            self.batch_tokens = self.token_budget(lengths, self.lengths.row_span(min(lengths)))
        rank, world = data_place(trainer) if trainer is not None else (0, 1)
        if self.continuous:
            plan = self.rank_groups(rank, world)
        else:
            plan = [[(i, None) for i in batch] for batch in self.rank_batches(rank, world)]
        self.planned_records = sum(len(group) for group in plan if group[0][0] != PADDING) * self.samples
        return DataLoader(_Examples(self.todo, self.pad_example), batch_sampler=PlannedBatches(plan),
                          collate_fn=self.collate, num_workers=0)

    def collate(self, items: list[tuple[bool, dict[str, Any], Group | None]]) -> Batch:
        """Left-pad prompts; carry the record fields along. ``max_new_tokens`` is resolved per batch."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        examples = [ex for _, ex, _ in items]
        input_ids, attention_mask = left_pad([ex["input_ids"] for ex in examples], pad)
        width = input_ids.shape[1]
        return Batch(input_ids, attention_mask, self.lengths.new_tokens(width), any(is_pad for is_pad, _, _ in items),
                     [{k: v for k, v in ex.items() if k != "input_ids"} | {"prompt_ids": ex["input_ids"]}
                      for ex in examples], items[0][2])


def _not_json(value: Any) -> str | None:
    """The type in ``value`` that JSON cannot hold, or None: ``{"a": b"x"}`` -> ``bytes``."""
    found: list[type] = []

    def default(obj: Any) -> Any:
        found.append(type(obj))
        raise TypeError

    try:
        json.dumps(value, default=default)
    except (TypeError, ValueError):
        kind = found[0] if found else type(value)
        return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return None


class _Examples(torch.utils.data.Dataset):
    """Examples by (index, group), as (is_padding, example, group); index ``PADDING`` is the padding
    example."""

    def __init__(self, examples: list[dict[str, Any]], pad_example: dict[str, Any]) -> None:
        self.examples = examples
        self.pad_example = pad_example

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: tuple[int, Group | None]) -> tuple[bool, dict[str, Any], Group | None]:
        index, group = item
        return (True, self.pad_example, None) if index == PADDING else (False, self.examples[index], group)
