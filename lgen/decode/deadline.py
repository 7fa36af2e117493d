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
