"""How long the work in flight may go on once a stop was asked for.

A scheduler sends SIGTERM and, a grace period later, SIGKILL (SLURM's ``KillWait`` is 30 s by
default). With continuous batching a pool can hold thousands of rows, each with up to
``max_new_tokens`` to go, so waiting for the pool to drain could outlast that grace period. A
:class:`Deadline` is set when the signal arrives; the engines stop admitting prompts at once, let
the rows in flight run on until ``grace_seconds`` have passed, and then drop the rows that have not
finished (they are generated again on resume, with the same records: a row does not depend on its
neighbours). Engines read it only; the signal handler (:mod:`lgen.interrupt`) sets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Deadline:
    """The moment a stop was asked for, and how long rows in flight may still take.

    Args:
        grace_seconds: after the stop was asked for, the time the rows in flight may take to finish;
            0 drops them at the next look.
    """

    def __init__(self, grace_seconds: float = 5.0) -> None:
        if grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {grace_seconds}")
        self.grace_seconds = float(grace_seconds)
        self.signum: int | None = None
        self._at: float | None = None

    def request(self, signum: int) -> None:
        """Ask for a stop (the first request sets the deadline; later ones keep it)."""
        if self.signum is None:
            self.signum = signum
            self._at = time.monotonic() + self.grace_seconds

    @property
    def requested(self) -> bool:
        """A stop was asked for: admit no more prompts."""
        return self.signum is not None

    def expired(self) -> bool:
        """The grace period is over: drop the rows still in flight."""
        return self._at is not None and time.monotonic() >= self._at

    def reset(self) -> None:
        self.signum, self._at = None, None


class AgreedDeadline:
    """A :class:`Deadline` as ranks that run every forward together (a tensor-parallel group) must
    see it: requested, or expired, once it is so on any of them (one small collective per look).
    A signal reaches each rank at its own moment; were each to heed only its own, one rank would
    leave the decode loop while the others wait in its next forward's all-reduce.

    Args:
        deadline: this rank's deadline (the signal handler sets it).
        agree: whether a flag holds on any rank (a collective every rank calls at the same point).
    """

    def __init__(self, deadline: Deadline, agree: Callable[[bool], bool]) -> None:
        self.deadline, self.agree = deadline, agree

    @property
    def requested(self) -> bool:
        return self.agree(self.deadline.requested)

    def expired(self) -> bool:
        return self.agree(self.deadline.expired())
