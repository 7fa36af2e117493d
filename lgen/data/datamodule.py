"""Rows to batches: the ``LightningDataModule`` that loads a split, cuts it into prompts and plans
left-padded batches.

Loading is :mod:`lgen.data.sources`, cutting rows into prompts :mod:`lgen.data.windows` (and
:mod:`lgen.data.examples` around it), what the data side refuses :mod:`lgen.data.checks` and
:mod:`lgen.data.chat`, the batch plan :mod:`lgen.data.plan`. What the data module needs from the
model side (the tokenizer, length limits, samples per prompt, a memory budget, whether ranks run in
lockstep) comes through :meth:`connect`; the examples already written by an earlier run through
:meth:`skip`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lgen.batch import Batch, Group, left_pad
from lgen.data import chat, checks, lengths
from lgen.data.examples import build as build_examples
from lgen.data.plan import PADDING, PlannedBatches, deal, plan_batches, rank_groups
from lgen.data.sources import load_split, local_files
from lgen.data.windows import Windowing
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
        self.template = chat.template(self.chat_template, system_prompt=self.system_prompt,
                                      complete=self.complete_mode, tokenizer=tokenizer)

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

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("GenerationDataModule.connect(tokenizer, ...) must run before setup")
        raw = self.load_raw()
        self.text_column_name = checks.columns(list(raw.column_names), text=self.text_column_name,
                                               reference=self.reference_column_name, id_column=self.id_column_name,
                                               keep=self.keep_columns)
        if len(raw) == 0:
            raise DataError(f"the dataset split {self.dataset_split!r} is empty: nothing to generate")
        checks.text_columns(raw, text=self.text_column_name, reference=self.reference_column_name)
        windowing = Windowing(complete=self.complete_mode, text=self.text_column_name,
                              reference=self.reference_column_name, id_column=self.id_column_name,
                              keep=tuple(self.keep_columns), block_size=self.resolved_block_size,
                              window=self.resolved_window, max_new_tokens=self.max_new_tokens,
                              subsamples=self.subsamples, seed=self.seed, chat=bool(self.chat_template),
                              template=self.template, system=self.system_prompt)
        built = build_examples(raw, tokenizer=self.tokenizer, windowing=windowing, subset=self.dataset_config_name,
                               cached=not self.overwrite_cache, workers=self.preprocessing_num_workers)
        if self.id_column_name is None:
            log.info("no data.id_column_name: the row index is the id")
        if not built.examples:
            hint = checks.drop_hint(set(built.drops), text=self.text_column_name,
                                    reference=self.reference_column_name, max_window_size=self.max_window_size,
                                    sample_by=self.sample_by, text_files=checks.reads_text(self.dataset_name,
                                                                                           self.data_files))
            raise DataError(f"every row was dropped ({built.drops}); {hint}")
        checks.json_values(built.examples, raw.features, id_column=self.id_column_name, keep=self.keep_columns)
        checks.unique_ids(built.examples, raw.features, id_column=self.id_column_name)
        self._check_batch_tokens(built.examples)
        if built.truncated:
            log.warning("%d of %d prompts are longer than max_window_size=%d tokens and keep only their last %d, "
                        "as run_gen.py did; raise data.block_size (or data.max_window_size) to keep more",
                        built.truncated, len(built.examples), self.resolved_window, self.resolved_window)
        self.stats = {"rows_read": len(raw), "rows_dropped": built.drops, "examples": len(built.examples),
                      "prompts_truncated": built.truncated}
        self.pad_example = built.examples[0]  # what padding batches run (a rank with no work still steps)
        self.examples = built.examples
        self._todo = None

    def _check_batch_tokens(self, examples: list[dict[str, Any]]) -> None:
        longest = max(len(ex["input_ids"]) for ex in examples)
        what = (f"data.block_size ({self.resolved_block_size}, with model.max_new_tokens: auto)"
                if self.max_new_tokens == "auto" else
                f"the longest prompt + model.max_new_tokens ({longest} + {self.max_new_tokens})")
        checks.batch_tokens(self.max_batch_tokens, need=self._row_tokens(longest), what=what, samples=self.samples)

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
        return Batch(input_ids, attention_mask, max_new_tokens=self.lengths.new_tokens(width),
                     padding=any(is_pad for is_pad, _, _ in items),
                     examples=[{k: v for k, v in ex.items() if k != "input_ids"} | {"prompt_ids": ex["input_ids"]}
                               for ex in examples], group=items[0][2])


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
