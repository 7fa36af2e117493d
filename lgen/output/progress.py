"""A progress bar that counts what matters for generation: records, and tokens per second."""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm import tqdm

from lgen.output.records import BatchRecords


class GenerationProgressBar(ProgressBar):
    """One bar on rank 0, over the records this rank plans (with continuous batching they finish
    out of batch order), with ``tokens`` and ``tok/s`` beside it, updated as each batch ends;
    closed before the summary is printed."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled:
            return
        total = getattr(trainer.datamodule, "planned_records", None) or None
        self._bar = tqdm(total=total, desc="generating", unit="record", file=sys.stderr, dynamic_ncols=True,
                         leave=True, smoothing=0, mininterval=0)
        self._start = time.perf_counter()
        self._tokens = 0

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: BatchRecords, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.on_records(trainer, pl_module, outputs)

    def on_records(self, trainer: Trainer, pl_module: LightningModule, outputs: BatchRecords) -> None:
        """Count records, a batch's or those a long call finished before it ended."""
        if self._bar is None:
            return
        self._tokens += sum(outputs.tokens)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix(tokens=self._tokens, tok_s=f"{self._tokens / elapsed:.1f}", refresh=False)
        self._bar.update(len(outputs.records))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()
