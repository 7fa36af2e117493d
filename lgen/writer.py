"""Records to files: one JSONL shard per rank, each batch written whole and fsynced before the next."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import Counter
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lgen import outputs
from lgen.merge import merge
from lgen.records import BatchRecords, record_key

log = logging.getLogger(__name__)


class JsonlWriter(BasePredictionWriter):
    """Append each batch's records to ``{rank+1:05d}-of-{world:05d}.{split}.jsonl``.

    A crash loses at most the batch in flight: every batch is written with one ``write``, flushed
    and fsynced. Records whose (id, part, seq) an earlier run wrote (``output.done``) are never
    written again.

    Args:
        output: the output directory, prepared by the CLI before the run (``OutputDir.prepare``).
        config_text: the resolved lgen config, written as ``lgen_config.yaml``.
        merge: write ``merged.{split}.jsonl`` when the run ends.
    """

    def __init__(self, output: outputs.OutputDir, *, config_text: str = "", merge: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.output_dir = output.path
        self.split = output.split
        self.config_text = config_text
        self.merge = merge
        self._file = None
        self.stats: Counter = Counter()
        self.reasons: Counter = Counter()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            for name, data in pl_module.config_dumps().items():
                outputs.write_json(self.output_dir / name, data)
            if self.config_text:
                outputs.write_json(self.output_dir / "lgen_config.yaml", self.config_text)
            outputs.write_json(self.output_dir / "fingerprint.json", self.output.fingerprint)
        self.done = set(self.output.done)
        path = self.output_dir / outputs.shard_name(trainer.global_rank, trainer.world_size, self.split)
        if path.exists():
            outputs.drop_torn_tail(path)
        self._file = open(path, "ab")
        self.path = path
        self._start = time.perf_counter()

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: BatchRecords,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        lines = []
        for record, tokens in zip(prediction.records, prediction.tokens):
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
            self._file.write("".join(lines).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "predict")
        mine = {"stats": dict(self.stats), "reasons": dict(self.reasons)}
        every = _gather(mine, trainer)
        if not trainer.is_global_zero:
            return
        total, reasons = Counter(), Counter()
        for part in every:
            total.update(part["stats"])
            reasons.update(part["reasons"])
        wall = time.perf_counter() - self._start
        data_stats = getattr(trainer.datamodule, "stats", {}) if trainer.datamodule is not None else {}
        summary = {
            **data_stats,
            "records_written": total["records_written"],
            "records_skipped_done": total["records_skipped_done"],
            "finish_reasons": dict(reasons),
            "generated_tokens": total["generated_tokens"],
            "generation_seconds": round(total["generation_seconds"], 3),
            "wall_seconds": round(wall, 3),
            "tokens_per_second": round(total["generated_tokens"] / wall, 2) if wall > 0 else None,
            "world_size": trainer.world_size,
            "versions": _versions(),
        }
        if "examples" in data_stats:
            summary["records_expected"] = data_stats["examples"] * pl_module.num_return_sequences
        outputs.write_json(self.output_dir / "summary.json", summary)
        if trainer.loggers:
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            flat.update({f"finish_reason/{k}": v for k, v in reasons.items()})
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=0)
                logger.save()
        log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if k != "versions"}))
        if self.merge:
            merge(self.output_dir, self.split, summary.get("records_expected"))


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
