"""Errors lgen reports as one line, without a traceback.

``UserError`` is for what the user must fix: a setting, the data, where the model comes from, the
output directory. The CLI prints its message (which names the key, the value and the fix) and exits
with 2. ``Interrupted`` and ``Incomplete`` are outcomes of a run, not bugs, and exit with their own
codes. Anything else is a bug in lgen or a library and keeps its traceback.
"""

from __future__ import annotations

import errno
import signal

# a full disk or quota: the user's to fix (free space, then the same command resumes), not a bug
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class LgenError(Exception):
    """Base of the errors the CLI prints as one line; ``exit_code`` is the process's exit status."""

    exit_code = 1


class UserError(LgenError):
    """Something the user must fix; the message says what and how."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A setting that cannot work, alone or with the others."""


class UnsupportedModel(ConfigError):
    """A model a decode setting turned out not to run (what the architecture check before loading
    could not see): ``what`` the model does, ``needs`` the setting that cannot run it, and the fix."""

    ENGINE = "the compact engine"

    def __init__(self, what: str, *, needs: str = ENGINE, fix: str = "set model.engine: generate") -> None:
        super().__init__(f"{needs} cannot run this model: {what}; {fix}")
        self.what, self.needs = what, needs


class DataError(UserError):
    """The dataset cannot be read, or leaves nothing to generate."""


class ModelSourceError(UserError):
    """A model, tokenizer, config or adapter that cannot be found or loaded."""


class OutputDirError(UserError):
    """The output directory cannot be used as asked."""


class Incomplete(LgenError):
    """Records are missing: a run ended with fewer than it planned, or a merge found gaps."""

    exit_code = 1


class Interrupted(LgenError):
    """A run stopped early on a signal, after writing every batch it finished."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum
        self.quiet = False  # another rank reports it
