"""Stopping a run early, within seconds, without losing what it finished.

Schedulers (SLURM preemption, Kubernetes) send SIGTERM and, a grace period later, SIGKILL; a user
presses Ctrl-C. Either way no prompt is admitted after the signal, the rows in flight get
``stop_grace_seconds`` to finish (:mod:`lgen.decode.deadline`), those still running then are dropped, the
batch's records are written, and the run ends: the summary is written, and the CLI says how to
resume and exits with 143 (SIGTERM) or 130 (SIGINT), even when every record happened to be in. A
second Ctrl-C stops at once; the rows in flight are then lost, and only those.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose  # Lightning's own handler
from lightning.pytorch.utilities import rank_zero_only

from lgen.decode.deadline import Deadline
from lgen.errors import Interrupted

log = logging.getLogger(__name__)


class GracefulStop(Callback):
    """Turns SIGTERM and SIGINT into a :class:`Deadline` the engines heed, then an
    :class:`Interrupted` raised once the batch in flight is written.

    The handlers live from predict start to predict end, and the previous ones are put back. A
    SIGTERM is passed on to the processes Lightning launched (DDP on one machine), as Lightning's
    own handler would; that handler is not called, since it also runs a collective broadcast from
    inside the signal handler, which hangs when the ranks are anywhere else than in step. Ranks that
    run every forward together (:attr:`lgen.hf.layout.Layout.agreed_stop`: ZeRO-3, a tensor-parallel
    group) agree after each batch, and at each look inside one, so they stop together.

    Args:
        grace_seconds: how long the rows in flight may take to finish after the signal.
    """

    def __init__(self, *, grace_seconds: float = 5.0) -> None:
        self.deadline = Deadline(grace_seconds)
        self._previous: dict[int, Any] = {}

    @property
    def signum(self) -> int | None:
        return self.deadline.signum

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.deadline.reset()
        pl_module.deadline = self.deadline
        # ranks that run every forward together stop after the same batch
        self._agreed = pl_module.layout.agreed_stop
        self._launcher = getattr(trainer.strategy, "launcher", None)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.deadline.signum == signal.SIGINT:
            raise Interrupted(signum)  # a second Ctrl-C: stop now
        if self.deadline.signum is None:
            self.deadline.request(signum)
            again = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
            if getattr(rank_zero_only, "rank", 0) == 0:  # one line per run, not per rank
                log.warning("%s: admitting no more prompts; the rows in flight get %g s to finish%s",
                            signal.Signals(signum).name, self.deadline.grace_seconds, again)
            if signum == signal.SIGTERM and self._launcher is not None:
                self._launcher.kill(signum)  # the ranks lgen started (their own handlers take it from there)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        """After the writer wrote the batch (it comes first among the callbacks): stop, unless rows
        of earlier batches are still in flight (continuous batching); then the next batch admits
        nothing and only winds them down, to the deadline."""
        signum = self.deadline.signum or 0
        if self._agreed:
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device),
                                                 reduce_op=torch.distributed.ReduceOp.MAX))
        if signum:
            self.deadline.request(signum)
            if not pl_module.engine.in_flight():
                raise Interrupted(signum)

    def _restore(self) -> None:
        """Put back the handlers found at predict start, except Lightning's: its teardown, later,
        puts back the ones from before the run, and until then a SIGTERM on a rank that is done
        would run its broadcast with nobody to answer."""
        for signum, handler in self._previous.items():
            if not isinstance(handler, _HandlersCompose):
                signal.signal(signum, handler)
        self._previous = {}

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
