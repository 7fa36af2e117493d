"""Records to files: one JSONL shard per rank, each batch written whole and fsynced before the next,
and ``summary.json``, which describes the whole output directory across runs."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lgen.errors import Interrupted, OutputDirError
from lgen.output import directory as outputs
from lgen.output.merge import merge
from lgen.output.records import BatchRecords, record_key

log = logging.getLogger(__name__)

# a run's own figures, kept per rank and summed over ranks
RUN_FIGURES = ("records_written", "records_skipped_done", "rows_dropped_at_stop", "generated_tokens",
               "generation_seconds")


class JsonlWriter(BasePredictionWriter):
    """Append each batch's records to ``{rank+1:05d}-of-{world:05d}.{split}.jsonl``.

    A crash loses at most the batch in flight: every batch is written with one ``write``, flushed
    and fsynced. Records whose (id, part, seq) an earlier run wrote (``output.done``) are never
    written again. Each rank counts the records its batches should give; a run that ends with
    fewer (``shortfall``) must not pass for a complete one.

    Args:
        output: the output directory, prepared by the CLI before the run (``OutputDir.prepare``).
        config_text: the resolved lgen config, written as ``lgen_config.yaml``.
        merge: write ``merged.{split}.jsonl`` when the run ends.
    """

    def __init__(self, output: outputs.OutputDir, *, config_text: str = "", merge: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.config_text = config_text
        self.merge = merge
        self._file = None
        self.stats: Counter = Counter()
        self.reasons: Counter = Counter()
        self.summary: dict[str, Any] = {}  # rank 0, once the run ended
        self.shortfall = 0  # records missing from this run's batches, over all ranks
        self.writes = True  # set in setup: whether this rank writes records
        self.files: dict[str, Any] = {}  # filled in by connect
        self.data_stats: dict[str, Any] = {}
        self.samples = 1
        self.engine: Callable[[], dict[str, Any]] = dict  # filled in by connect

    def connect(self, *, files: dict[str, Any], data_stats: dict[str, Any], samples: int,
                engine: Callable[[], dict[str, Any]] = dict) -> None:
        """What the run writes beside the records, from the parts that know it: JSON files (the
        model and generation configs, as run_gen.py wrote them), the data's counts for the
        summary, the records each prompt gives (``samples``), and what the summary says of the
        engine (``engine()``, asked when the run ends: the engine is settled once the model loaded)."""
        self.files, self.data_stats, self.samples, self.engine = dict(files), dict(data_stats), samples, engine

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.output.path.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            outputs.remove_derived(self.output.path, self.output.split)
            for name, data in self.files.items():
                outputs.write_json(self.output.path / name, data)
            if self.config_text:
                outputs.write_json(self.output.path / "lgen_config.yaml", self.config_text)
        self.done = set(self.output.done)
        self.writes = outputs.writes(trainer)  # a tensor-parallel group's first rank writes the group's rows
        self._start = time.perf_counter()
        self._started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not self.writes:
            return
        self.path = self.output.path / outputs.shard_name(*outputs.data_place(trainer), self.output.split)
        self.run_path = outputs.run_file(self.output.path, *outputs.data_place(trainer), self.output.split)
        self._note(ended=False)
        if self.path.exists():
            outputs.drop_torn_tail(self.path)
        self._file = open(self.path, "ab")

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: BatchRecords,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not self.writes:
            return
        if not batch.padding:
            self.stats["records_planned"] += len(batch.examples) * self.samples
        self.on_records(trainer, pl_module, prediction)

    def on_records(self, trainer: Trainer, pl_module: LightningModule, prediction: BatchRecords) -> None:
        """Write records, whole, flushed and fsynced: a batch's, or those a long call finished
        before it ended (``GenerationModule`` hands them to every callback that has this hook)."""
        if not self.writes:
            return
        self.stats["rows_dropped_at_stop"] += prediction.dropped
        lines = []
        for record, tokens in zip(prediction.records, prediction.tokens):
            self.stats["records_produced"] += 1
            key = record_key(record)
            if key in self.done:
                self.stats["records_skipped_done"] += 1
                continue
            self.done.add(key)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            self.stats["records_written"] += 1
            self.stats["generated_tokens"] += tokens
            self.stats["generation_seconds"] += prediction.seconds / len(prediction.records)
            self.reasons[record["finish_reason"]] += 1
        if lines:
            try:
                self._file.write("".join(lines).encode("utf-8"))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as err:
                raise outputs.unwritable(self.path, err) from err
        self._note(ended=False)

    def _note(self, *, ended: bool) -> None:
        """This rank's figures of the run so far, beside its shard (``outputs.run_file``), for rank 0
        to sum when a stop leaves no time for a collective (:meth:`on_exception`). Replaced whole,
        not fsynced: it only has to outlast the run."""
        tmp = self.run_path.with_name(self.run_path.name + ".lgen-tmp")
        try:
            tmp.write_text(json.dumps({"ended": ended, **{k: self.stats[k] for k in RUN_FIGURES}}))
            os.replace(tmp, self.run_path)
        except OSError as err:  # the figures then come from this rank alone; the records are on disk
            log.warning("%s not written: %s", self.run_path.name, err)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "predict")
        try:
            every = _gather({"stats": dict(self.stats), "reasons": dict(self.reasons)}, trainer)
        except RuntimeError:  # a rank that stopped on a signal has left: this one stops too
            deadline = getattr(pl_module, "deadline", None)
            if deadline is None or not deadline.requested:
                raise
            raise Interrupted(deadline.signum) from None
        stats, reasons = Counter(), Counter()
        for part in every:
            stats.update(part["stats"])
            reasons.update(part["reasons"])
        self.shortfall = stats["records_planned"] - stats["records_produced"]
        if trainer.is_global_zero:
            records = len(self.output.done) + stats["records_written"]
            self._write_summary(trainer, stats, self.output.reasons + reasons, records,
                                "complete" if not self.shortfall else f"{self.shortfall} records missing")
            self._forget_runs(trainer)
            if self.merge:
                merge(self.output.path, self.output.split)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A run stopped early (a signal) or failed: the summary still describes the directory, from
        its shards once every writing rank has ended (each says so in its run file; rank 0 waits up
        to ``wait_seconds`` for them), and this run's figures are their sum."""
        self.teardown(trainer, pl_module, "predict")
        if self.writes and hasattr(self, "run_path"):
            self._note(ended=True)
        if trainer.is_global_zero and hasattr(self, "_start"):
            status = (f"interrupted ({exception})" if isinstance(exception, Interrupted)
                      else f"failed ({type(exception).__name__})")
            try:
                stats = self._every_rank(trainer)
                keys, reasons = outputs.scan(self.output.path, self.output.split)
                self._write_summary(trainer, stats, reasons, len(keys), status)
            except (OSError, OutputDirError) as err:  # e.g. the disk that failed the batch is still full
                log.warning("summary.json not updated: %s", err)
            self._forget_runs(trainer)

    wait_seconds = 30.0

    def _every_rank(self, trainer: Trainer) -> Counter:
        """The figures of every writing rank's run file, once all have ended (or ``wait_seconds``
        passed: then those there are; a rank that died keeps its records on disk, not its figures)."""
        _, places = outputs.data_place(trainer)
        paths = [outputs.run_file(self.output.path, p, places, self.output.split) for p in range(places)]
        deadline = time.monotonic() + self.wait_seconds
        while True:
            notes = []
            for path in paths:
                try:
                    notes.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    notes.append({})
            if all(n.get("ended") for n in notes) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stats = Counter()
        for note in notes:
            stats.update({k: note.get(k, 0) for k in RUN_FIGURES})
        return stats

    def _forget_runs(self, trainer: Trainer) -> None:
        """The run files go once the summary holds their sum."""
        _, places = outputs.data_place(trainer)
        for place in range(places):
            outputs.run_file(self.output.path, place, places, self.output.split).unlink(missing_ok=True)

    def _write_summary(self, trainer: Trainer, stats: Counter, reasons: Counter, records: int, status: str) -> None:
        self.write_summary(stats, reasons, records, status, world_size=trainer.world_size,
                           data_stats=self.data_stats, loggers=trainer.loggers)

    def rebuild_summary(self, data_stats: dict[str, Any]) -> None:
        """A ``summary.json`` from the shards alone, for a directory whose summary was deleted (a
        no-op resume writes it again); the history of earlier runs went with the file."""
        self._start = time.perf_counter()
        self._started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        keys, reasons = outputs.scan(self.output.path, self.output.split)
        missing = self.output.expected - len(keys)
        self.write_summary(Counter(), reasons, len(keys), "complete" if missing <= 0 else f"{missing} records missing",
                           world_size=1, data_stats=data_stats)

    def write_summary(self, stats: Counter, reasons: Counter, records: int, status: str, *, world_size: int,
                      data_stats: dict[str, Any], loggers: Any = ()) -> None:
        """Write ``summary.json``: the directory's totals, earlier runs' figures, and this run's."""
        wall = time.perf_counter() - self._start
        data_stats = dict(data_stats or {})
        run = {
            "started": self._started,
            "status": status,
            "examples_skipped_done": data_stats.pop("examples_skipped_done", 0),
            "records_written": stats["records_written"],
            "records_skipped_done": stats["records_skipped_done"],
            "rows_dropped_at_stop": stats["rows_dropped_at_stop"],
            "generated_tokens": stats["generated_tokens"],
            "generation_seconds": round(stats["generation_seconds"], 3),
            "wall_seconds": round(wall, 3),
            "tokens_per_second": round(stats["generated_tokens"] / wall, 2) if wall > 0 else None,
            "world_size": world_size,
            **self.engine(),
            "versions": _versions(),
        }
        runs = [*_earlier_runs(self.output.summary()), run]
        summary = {
            **data_stats,
            "records_expected": self.output.expected,
            "records": records,
            "records_missing": max(self.output.expected - records, 0),
            "finish_reasons": dict(sorted(reasons.items())),
            "generated_tokens": sum(r.get("generated_tokens", 0) for r in runs),
            "generation_seconds": round(sum(r.get("generation_seconds", 0) for r in runs), 3),
            "runs": runs,
        }
        outputs.write_json(self.output.path / "summary.json", summary)
        self.summary = summary
        if loggers:
            flat = {k: v for k, v in {**run, **summary}.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            flat.update({f"finish_reason/{k}": v for k, v in reasons.items()})
            for logger in loggers:
                logger.log_metrics(flat, step=0)
                logger.save()


def _earlier_runs(old: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs an existing ``summary.json`` (``old``, {} if none) lists; one from a summary of lgen
    before 0.2."""
    if not old:
        return []
    if "runs" in old:
        return list(old["runs"])
    keys = ("records_written", "records_skipped_done", "generated_tokens", "generation_seconds", "wall_seconds",
            "tokens_per_second", "world_size", "versions", "examples_skipped_done")
    return [{k: old[k] for k in keys if k in old}]


def _gather(obj: Any, trainer: Trainer) -> list[Any]:
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _versions() -> dict[str, str]:
    import lightning
    import transformers

    import lgen

    return {"lgen": lgen.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}
