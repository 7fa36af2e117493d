"""A progress bar that counts what matters for generation: records and generated tokens per second."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from lgen.records import BatchRecords


class GenerationProgressBar(TQDMProgressBar):
    """Batches as the bar, with ``records``, ``tokens`` and ``tok/s`` beside it."""

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._t0 = time.perf_counter()
        self._records = self._tokens = 0

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: BatchRecords, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._records += len(outputs.records)
        self._tokens += sum(outputs.tokens)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self.predict_progress_bar.set_postfix(
            records=self._records, tokens=self._tokens, tok_s=f"{self._tokens / elapsed:.1f}", refresh=False)
