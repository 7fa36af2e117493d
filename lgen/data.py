"""Rows to prompts: load with ``datasets``, tokenize once, window or truncate, filter, plan batches.

Two modes, as in run_gen.py:

* complete mode (``reference_column_name`` set): one prompt per row, the text's last
  ``max_window_size`` tokens; rows whose prompt + reference exceed ``block_size - 1`` are dropped.
* strided mode: each row is a long text. The last ``max_new_tokens`` tokens are held back, the rest
  is cut into the fewest near-equal windows of at most ``max_window_size`` tokens; window k's
  reference is window k+1, the last window's reference is the held-back tail. E.g. 10 tokens,
  ``max_window_size=4``, ``max_new_tokens=2``: rest=8 -> windows [0:4] [4:8], references [4:8] [8:10].

The batch plan (which examples go together, in which order) is computed once from the data and
the settings alone, then whole batches are dealt to ranks, so results do not depend on world size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lgen.outputs import id_key

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
Key = tuple[str, tuple[int, int]]  # (id as JSON text, part)
RECORD_FIELDS = ("id", "part", "seq", "prompt", "reference", "prediction", "finish_reason", "meta")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the fix."""


class GenerationDataModule(LightningDataModule):
    """Loads a dataset and turns it into left-padded, length-planned prompt batches.

    Args:
        dataset_name: a Hub dataset, a folder written by ``save_to_disk``, or, with ``data_files``,
            a builder name (``json``, ``csv``, ``parquet``, ``text``; inferred from the file suffix when unset).
        data_files: local file(s) for ``dataset_split``.
        dataset_config_name: the dataset configuration (also written to each record's ``meta.subset``).
        dataset_split: the split to generate for; it also names the output shards.
        dataset_revision: dataset version (branch, tag or commit) on the Hub.
        text_column_name: the prompt column; default ``text`` if present, else the first column.
        reference_column_name: the reference column; setting it selects complete mode.
        id_column_name: the id column; default the row index.
        keep_columns: columns copied into every record.
        streaming: read the split as a stream (it is still materialised before planning).
        overwrite_cache: re-run tokenization instead of using the ``datasets`` cache.
        preprocessing_num_workers: processes for tokenization.
        per_device_batch_size: the most prompts in one batch.
        max_batch_tokens: also cap a batch's KV-cache tokens, rows x samples x (longest prompt +
            max_new_tokens; ``block_size`` with ``max_new_tokens: auto``), so memory has a bound.
            ``auto``: on CUDA, what fits in the memory left after the weights (the least over all
            ranks); no cap elsewhere.
        block_size: cap on prompt + generation; default from the tokenizer and model.
        max_window_size: the most prompt tokens; default ``block_size - max_new_tokens``.
        subsamples: in strided mode, keep this many randomly chosen windows per row (seeded).
        sort_by_length: plan batches longest-first (much less padding); records are the same rows.
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
        max_batch_tokens: int | Literal["auto"] | None = None,
        block_size: int | None = None,
        max_window_size: int | None = None,
        subsamples: int | None = None,
        sort_by_length: bool = True,
        mode: Literal["auto", "complete", "strided"] = "auto",
        max_new_tokens: int | Literal["auto"] | None = None,
        seed: int = 0,
        token: str | None = None,
    ) -> None:
        super().__init__()
        if dataset_name is None and data_files is None:
            raise ConfigError("set data.dataset_name (a Hub dataset or a saved folder) or data.data_files (local files)")
        if per_device_batch_size < 1:
            raise ConfigError(f"data.per_device_batch_size must be >= 1, got {per_device_batch_size}")
        if subsamples is not None and subsamples < 1:
            raise ConfigError(f"data.subsamples must be >= 1, got {subsamples}")
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
        if isinstance(max_batch_tokens, int) and max_batch_tokens < 1:
            raise ConfigError(f"data.max_batch_tokens must be >= 1 or auto, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.batch_tokens = max_batch_tokens if isinstance(max_batch_tokens, int) else None  # resolved
        self.samples = 1  # num_return_sequences, set by connect()
        self.block_size = block_size
        self.max_window_size = max_window_size
        self.subsamples = subsamples
        self.sort_by_length = sort_by_length
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.token = token
        self.tokenizer = None
        self.examples: list[dict[str, Any]] | None = None
        self.stats: dict[str, Any] = {}
        self.done: set[Key] = set()

    @property
    def complete_mode(self) -> bool:
        return self.mode == "complete" or (self.mode == "auto" and self.reference_column_name is not None)

    # ---- connect: run-time facts from the model side -------------------------------------------

    def connect(self, tokenizer, max_position_embeddings: int | None = None, reserved_tokens: int = 0,
                done: Iterable[Key] = (), samples: int = 1) -> None:
        """Receive the tokenizer and model limits, resolve lengths, and validate them.

        ``reserved_tokens`` (prompt-tuning virtual tokens) come off ``block_size``; ``done`` lists
        the (id, part) pairs already written in full, which are not generated again; ``samples``
        (``num_return_sequences``) multiplies each prompt's cache tokens in ``max_batch_tokens``.
        """
        self.tokenizer = tokenizer
        self.samples = samples
        self.done = set(done)
        block = self.block_size
        if block is None:
            block = tokenizer.model_max_length
            if max_position_embeddings is not None and block > max_position_embeddings:
                log.warning("tokenizer.model_max_length=%s exceeds the model's max_position_embeddings=%s; "
                            "using block_size=%s (set data.block_size to choose)", block, max_position_embeddings,
                            min(1024, max_position_embeddings))
                block = min(1024, max_position_embeddings)
        block -= reserved_tokens
        mnt = self.max_new_tokens
        if mnt is None:
            raise ConfigError("model.max_new_tokens must be set: an integer, or 'auto' in complete mode")
        if mnt == "auto" and self.reference_column_name is None:
            raise ConfigError("model.max_new_tokens: auto needs data.reference_column_name (complete mode); "
                              "without references give an integer")
        if self.mode == "strided" and self.reference_column_name is not None:
            raise ConfigError("data.mode: strided takes its references from the text; unset data.reference_column_name")
        if isinstance(mnt, int) and mnt < 1:
            raise ConfigError(f"model.max_new_tokens must be >= 1, got {mnt}")
        window = self.max_window_size
        if window is None:
            window = block if mnt == "auto" else block - mnt
        if window < 1:
            raise ConfigError(f"max_window_size={window} (block_size={block}, max_new_tokens={mnt}) leaves no room "
                              "for a prompt: raise data.block_size or lower model.max_new_tokens")
        if not self.complete_mode and window + mnt > block:
            raise ConfigError(f"data.max_window_size + model.max_new_tokens = {window} + {mnt} = {window + mnt} "
                              f"exceeds data.block_size={block}; lower one of them or raise data.block_size")
        if self.complete_mode and window > block:
            raise ConfigError(f"data.max_window_size={window} exceeds data.block_size={block}: "
                              "a prompt would not fit; lower data.max_window_size")
        self.resolved_block_size, self.resolved_window = block, window

    # ---- loading and preprocessing ---------------------------------------------------------------

    def load_raw(self):
        """The raw split, as a ``datasets.Dataset``."""
        import datasets

        name, split = self.dataset_name, self.dataset_split
        if self.data_files:
            for f in self.data_files:
                if not any(ch in f for ch in "*?[") and not Path(f).is_file():
                    raise ConfigError(f"data.data_files: {f!r} does not exist")
            builder = name or LOCAL_FORMATS.get(Path(self.data_files[0]).suffix.lower())
            if builder is None:
                raise ConfigError(f"data.dataset_name: cannot tell the format of {self.data_files[0]!r}; "
                                  "set it to json, csv, parquet or text")
            if builder in ("json", "csv", "text"):
                for f in self.data_files:
                    if Path(f).is_file():
                        _check_utf8(f)
            try:
                ds = datasets.load_dataset(builder, data_files={split: self.data_files}, split=split,
                                           streaming=self.streaming)
            except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
                if "corresponds to no data" in str(err):
                    raise ConfigError(f"the dataset in data.data_files={self.data_files} is empty: "
                                      "nothing to generate") from err
                raise ConfigError(f"data.data_files={self.data_files} could not be read as {builder!r}: "
                                  f"{err.__cause__ or err}; check the file or set data.dataset_name") from err
        elif name is not None and Path(name).is_dir() and any(
                (Path(name) / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"data.dataset_split={split!r} is not in {name}; splits: {sorted(ds)}")
                ds = ds[split]
        else:
            try:
                ds = datasets.load_dataset(name, self.dataset_config_name, split=split, revision=self.dataset_revision,
                                           streaming=self.streaming, token=self.token)
            except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
                raise ConfigError(f"data.dataset_name={name!r} (split {split!r}) could not be loaded: {err}") from err
        if self.streaming:
            ds = datasets.Dataset.from_list(list(ds))
        return ds

    def _check_columns(self, columns: list[str]) -> None:
        if not columns:
            raise ConfigError("the dataset is empty: it has no columns; check data.dataset_name / data.data_files")
        if self.text_column_name is None:
            self.text_column_name = "text" if "text" in columns else columns[0]
        for key in ("text_column_name", "reference_column_name", "id_column_name"):
            value = getattr(self, key)
            if value is not None and value not in columns:
                raise ConfigError(f"data.{key}={value!r} is not a column of the dataset; columns: {columns}")
        clash = [c for c in self.keep_columns if c in RECORD_FIELDS]
        if clash:
            raise ConfigError(f"data.keep_columns: {clash} would overwrite record fields {list(RECORD_FIELDS)}; "
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
            raise ConfigError(f"the dataset split {self.dataset_split!r} is empty: nothing to generate")
        windowing = Windowing(self.complete_mode, self.text_column_name, self.reference_column_name, self.id_column_name,
                              tuple(self.keep_columns), self.resolved_block_size, self.resolved_window,
                              self.max_new_tokens, self.subsamples, self.seed)
        processed = raw.map(
            make_examples, batched=True, with_indices=True, remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "w": windowing},
            load_from_cache_file=not self.overwrite_cache, num_proc=self.preprocessing_num_workers,
            desc="tokenizing",
        )
        drops = Counter(d for d in processed["drop"] if d)
        for reason, n in drops.items():
            log.warning("dropped %d of %d rows: %s", n, len(raw), reason)
        if self.id_column_name is None:
            log.info("no data.id_column_name: the row index is the id")
        kept = processed.filter(lambda d: not d, input_columns="drop")
        if len(kept) == 0:
            raise ConfigError(f"every row was dropped by the length filters ({dict(drops)}); raise data.block_size "
                              "or lower data.max_window_size / model.max_new_tokens")
        examples = []
        self.pad_example = None  # what padding batches run (a rank with no work still steps)
        for ex in kept:
            ex.pop("drop")
            ex["keep"] = {c: ex.pop(f"keep.{c}") for c in self.keep_columns}
            ex["meta"] = {"subset": self.dataset_config_name, "row": ex["row"]}
            self.pad_example = self.pad_example or ex
            if (id_key(ex["id"]), tuple(ex["part"])) not in self.done:
                examples.append(ex)
        self.stats = {"rows_read": len(raw), "rows_dropped": dict(drops), "examples": len(kept),
                      "examples_skipped_done": len(kept) - len(examples)}
        self.examples = examples
        self.fingerprint = processed._fingerprint

    # ---- planning and loading --------------------------------------------------------------------

    def plan(self) -> list[list[int]]:
        """All batches, as lists of example indices, in the order they run. Depends only on the data."""
        assert self.examples is not None
        lengths = [len(ex["input_ids"]) for ex in self.examples]
        order = list(range(len(lengths)))
        if self.sort_by_length:
            order.sort(key=lambda i: (-lengths[i], i))

        def row_tokens(longest: int) -> int:  # one prompt's cache, all its samples
            span = self.resolved_block_size if self.max_new_tokens == "auto" else longest + int(self.max_new_tokens)
            return self.samples * span

        batches: list[list[int]] = []
        for i in order:
            cur = batches[-1] if batches else None
            if cur is not None and len(cur) < self.per_device_batch_size:
                longest = max(lengths[j] for j in cur + [i])
                if self.batch_tokens is None or (len(cur) + 1) * row_tokens(longest) <= self.batch_tokens:
                    cur.append(i)
                    continue
            batches.append([i])
        return batches

    def rank_batches(self, rank: int, world_size: int, equalize: bool = False) -> list[list[int]]:
        """Whole batches dealt round-robin. A rank left with none gets one padding batch (Lightning
        needs at least one); with ``equalize`` (synced generation under ZeRO-3) every rank gets the
        same count. A padding batch is ``[-1]``: one row of ``pad_example``, never written."""
        batches = self.plan()
        mine = batches[rank::world_size]
        most = math.ceil(len(batches) / world_size) if equalize else 1
        if len(mine) < most:
            mine = mine + [[-1]] * (most - len(mine))
        return mine

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.max_batch_tokens == "auto" and trainer is not None:
            self.batch_tokens = self._auto_batch_tokens(trainer)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        equalize = trainer is not None and getattr(trainer.strategy, "zero_stage_3", False)
        return DataLoader(_Examples(self.examples, self.pad_example), batch_sampler=PlannedBatches(self.rank_batches(rank, world, equalize)),
                          collate_fn=self.collate, num_workers=0)

    def _auto_batch_tokens(self, trainer) -> int | None:
        """The token budget that fits this device, agreed by all ranks (the plan must be global)."""
        from lgen.engine import token_budget

        module = trainer.lightning_module
        if module.device.type != "cuda":
            log.info("data.max_batch_tokens: auto caps batches on CUDA only; no cap on %s", module.device.type)
            return None
        free, _ = torch.cuda.mem_get_info(module.device)
        lengths = [len(ex["input_ids"]) for ex in self.examples] or [1]
        shortest = self.resolved_block_size if self.max_new_tokens == "auto" else min(lengths) + int(self.max_new_tokens)
        budget = torch.tensor([token_budget(module.model, free, row_span=shortest, prompt_width=max(lengths))],
                              device=module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN)
        log.info("data.max_batch_tokens: auto -> %d tokens (%.1f GiB free on this rank)", int(budget), free / 2**30)
        return int(budget)

    def collate(self, items: list[tuple[bool, dict[str, Any]]]) -> dict[str, Any]:
        """Left-pad prompts; carry the record fields along. ``max_new_tokens`` is resolved per batch."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        examples = [ex for _, ex in items]
        width = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for r, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[r, width - n:] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[r, width - n:] = 1
        mnt = self.resolved_block_size - width if self.max_new_tokens == "auto" else self.max_new_tokens
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "max_new_tokens": int(mnt),
            "padding": any(is_pad for is_pad, _ in items),
            "examples": [{k: v for k, v in ex.items() if k != "input_ids"} | {"prompt_ids": ex["input_ids"]}
                         for ex in examples],
        }


def make_examples(rows: dict[str, list], indices: list[int], tokenizer, w: Windowing) -> dict[str, list]:
    """Batched ``.map``: rows in, examples out (several per row in strided mode)."""
    tok = tokenizer
    texts = rows[w.text]
    ids = tok([str(t) for t in texts], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {k: [] for k in ("id", "row", "part", "input_ids", "reference", "drop")}
    for c in w.keep:
        out[f"keep.{c}"] = []

    def emit(i: int, part: list[int], prompt: list[int], reference: str, drop: str = "") -> None:
        out["id"].append(rows[w.id_column][i] if w.id_column else indices[i])
        out["row"].append(indices[i])
        out["part"].append(part)
        out["input_ids"].append(prompt)
        out["reference"].append(reference)
        out["drop"].append(drop)
        for c in w.keep:
            out[f"keep.{c}"].append(rows[c][i])

    block, window, mnt = w.block_size, w.window, w.max_new_tokens
    if w.complete:
        refs = [str(r) for r in rows[w.reference]] if w.reference else [""] * len(ids)
        ref_lens = [len(r) for r in tok(refs, add_special_tokens=False)["input_ids"]] if w.reference else [0] * len(ids)
        for i, toks in enumerate(ids):
            prompt = toks[-window:]
            if not prompt:
                emit(i, [1, 1], [], refs[i], "empty prompt")
            elif len(prompt) + ref_lens[i] > block - 1:
                emit(i, [1, 1], [], refs[i], "prompt + reference > block_size - 1")
            else:
                emit(i, [1, 1], prompt, refs[i])
        return out
    for i, toks in enumerate(ids):
        if len(toks) < window + mnt:
            emit(i, [1, 1], [], "", "shorter than max_window_size + max_new_tokens")
            continue
        rest, tail = toks[:-mnt], toks[-mnt:]
        windows = [a.tolist() for a in np.array_split(np.asarray(rest), math.ceil(len(rest) / window))]
        references = windows[1:] + [tail]
        chosen = range(len(windows))
        if w.subsamples is not None and w.subsamples < len(windows):
            rng = np.random.default_rng([w.seed, indices[i]])
            chosen = sorted(rng.choice(len(windows), w.subsamples, replace=False).tolist())
        decoded = tok.batch_decode([references[k] for k in chosen], skip_special_tokens=False)
        for k, ref in zip(chosen, decoded):
            emit(i, [k + 1, len(windows)], windows[k], ref)
    return out


@dataclass(frozen=True)
class Windowing:
    """What ``make_examples`` needs from the settings (hashable, so ``datasets`` can cache the map)."""

    complete: bool
    text: str
    reference: str | None
    id_column: str | None
    keep: tuple[str, ...]
    block_size: int
    window: int
    max_new_tokens: int | str
    subsamples: int | None
    seed: int


def _check_utf8(path: str) -> None:
    """Fail with the file and byte offset instead of a decoder error deep inside ``datasets``."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ConfigError(f"data.data_files: {path} is not UTF-8 (byte {offset + err.start}: "
                                  f"{chunk[err.start:err.start + 4]!r}); re-encode it, e.g. iconv -f latin1 -t utf-8")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ConfigError(f"data.data_files: {path} ends inside a UTF-8 character; re-encode it as UTF-8")


class PlannedBatches(torch.utils.data.Sampler):
    """A fixed list of batches (a batch sampler): the plan, not a shuffle or a distributed split."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Examples(torch.utils.data.Dataset):
    """Examples by index, as (is_padding, example); index -1 is the padding example."""

    def __init__(self, examples: list[dict[str, Any]], pad_example: dict[str, Any]) -> None:
        self.examples = examples
        self.pad_example = pad_example

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[bool, dict[str, Any]]:
        return (True, self.pad_example) if index < 0 else (False, self.examples[index])

