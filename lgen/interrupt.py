"""Stopping a run early without losing what it finished.

Schedulers (SLURM preemption, Kubernetes) send SIGTERM and, a grace period later, SIGKILL; a user
presses Ctrl-C. Either way the run ends at the next batch boundary: every finished batch is already
on disk, the summary is written, and the CLI says how to resume and exits with 143 (SIGTERM) or
130 (SIGINT). A second Ctrl-C stops at once; the batch in flight is then lost, and only that one.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lgen import zero3
from lgen.errors import Interrupted

log = logging.getLogger(__name__)


class GracefulStop(Callback):
    """Turns SIGTERM and SIGINT into an :class:`Interrupted` raised before the next batch starts.

    The handlers live from predict start to predict end, and the previous ones are put back. A
    SIGTERM also goes on to the previous handler (Lightning's, which passes it to the processes it
    launched). Ranks in lockstep (ZeRO-3) agree before each batch, so they stop together.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signum = None
        self._lockstep = zero3.lockstep(trainer.strategy)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise Interrupted(signum)  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
            log.warning("%s: stopping after the current batch%s", signal.Signals(signum).name, again)
        previous = self._previous.get(signum)
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, frame)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        signum = self.signum or 0
        if self._lockstep:
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device),
                                                 reduce_op=torch.distributed.ReduceOp.MAX))
        if signum:
            raise Interrupted(signum)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
